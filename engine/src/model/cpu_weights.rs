//! [`CpuWeights`]: how the packed CPU kernels store projection weights, and [`CpuActivations`]:
//! how activations meet the quantised ones.

use std::fmt;
use std::str::FromStr;

use sluice_kernels::matmul::{QuantizedLinear, WeightFormat};

/// How projection weights are stored for the packed CPU matmul (f32 activations on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CpuWeights {
    /// As the file stores them wherever the kernels have that format, keeping their values
    /// exactly: GGUF Q4_1 as int4 and Q8_0 as int8 (with f32 activations the kernels compute with
    /// the very numbers dequantisation gives, so the output equals [`WeightFormat::F32`]'s, bit for
    /// bit, with a fifth to an eighth of the bytes read per token); f16 and bf16 safetensors as bf16 where
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

/// How activations are multiplied with int8 and int4 weights on the CPU (f32 and bf16 weights
/// always take f32 activations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CpuActivations {
    /// `Int8` where the CPU has AVX-512 VNNI, `F32` elsewhere.
    #[default]
    Auto,
    /// Exact: each weight widened to f32, f32 products (the same bits as the dequantised model).
    F32,
    /// Activations quantised to int8 per row and group of 32 at each step, integer dot products
    /// with the weights' codes (as llama.cpp does for these formats): 1.7-2.5× faster matmuls with
    /// VNNI, outputs within the activations' int8 rounding of the exact ones, still identical for a
    /// row at every batch size.
    Int8,
}

impl CpuActivations {
    /// `Auto` decided for this CPU: whether the int8 path is taken.
    pub fn int8(self) -> bool {
        match self {
            Self::Auto => QuantizedLinear::accelerated(),
            Self::F32 => false,
            Self::Int8 => true,
        }
    }
}

impl FromStr for CpuActivations {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" => Self::F32,
            "int8" => Self::Int8,
            other => return Err(format!("CPU activations must be auto, f32 or int8, got `{other}`")),
        })
    }
}

impl fmt::Display for CpuActivations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Int8 => "int8",
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

    #[test]
    fn parses_and_prints_every_activation_choice() {
        for s in ["auto", "f32", "int8"] {
            let a: CpuActivations = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        assert!(CpuActivations::Int8.int8() && !CpuActivations::F32.int8());
        assert_eq!(CpuActivations::Auto.int8(), QuantizedLinear::accelerated());
        assert!("bf16".parse::<CpuActivations>().unwrap_err().contains("int8"));
    }
}
