//! [`CpuWeights`]: how the packed CPU kernels store projection weights.

use std::fmt;
use std::str::FromStr;

use sluice_kernels::matmul::WeightFormat;

/// How projection weights are stored for the packed CPU matmul (f32 activations on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CpuWeights {
    /// As the file stores them wherever the kernels have that format, keeping their values
    /// exactly: GGUF Q4_1 as int4 and Q8_0 as int8 (the kernels compute with the very numbers
    /// dequantisation gives, so the output equals [`WeightFormat::F32`]'s, bit for bit, with a
    /// fifth to an eighth of the bytes read per token); f16 and bf16 safetensors as bf16 where
    /// exact; everything else as f32.
    #[default]
    Native,
    /// Every projection repacked into one format (bf16, int8 and int4 round the weights).
    Repack(WeightFormat),
}

impl FromStr for CpuWeights {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "native" => Self::Native,
            "f32" => Self::Repack(WeightFormat::F32),
            "bf16" => Self::Repack(WeightFormat::Bf16),
            "int8" => Self::Repack(WeightFormat::Int8),
            "int4" => Self::Repack(WeightFormat::Int4),
            other => return Err(format!("CPU weights must be native, f32, bf16, int8 or int4, got `{other}`")),
        })
    }
}

impl fmt::Display for CpuWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Repack(WeightFormat::F32) => "f32",
            Self::Repack(WeightFormat::Bf16) => "bf16",
            Self::Repack(WeightFormat::Int8) => "int8",
            Self::Repack(WeightFormat::Int4) => "int4",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_choice() {
        for s in ["native", "f32", "bf16", "int8", "int4"] {
            let w: CpuWeights = s.parse().unwrap();
            assert_eq!(w.to_string(), s);
        }
        assert_eq!("INT4".parse::<CpuWeights>(), Ok(CpuWeights::Repack(WeightFormat::Int4)));
        assert!("q4".parse::<CpuWeights>().unwrap_err().contains("int4"));
    }
}
