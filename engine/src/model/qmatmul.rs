//! GGUF weights kept quantized for candle's `QMatMul` ([`GpuWeights::Quantized`]): the file's
//! blocks, reordered and stacked as the loader does for dense weights, uploaded as a `QTensor`.
//!
//! A GGUF quantized tensor `[n, k]` is stored row after row, each row a run of whole blocks along
//! `k` (32 or 256 weights a block). Moving or concatenating rows is therefore moving byte ranges,
//! which is how the Q/K RoPE row permutation and the QKV / gate-up fusion are done here, without
//! dequantizing.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::{EngineError, Result};

/// How GGUF-quantized projection weights are held off the CPU (on CUDA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GpuWeights {
    /// As the file stores them, in candle's `QMatMul` (its MMVQ/MMQ CUDA kernels, activations
    /// quantized to 8 bits per block of 32 as llama.cpp does), for the ggml types those kernels
    /// cover ([`GgufBlocks::supported`]): Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K. Any other
    /// weight is dequantized to the dtype.
    #[default]
    Quantized,
    /// Every weight dequantized to the dtype at load (candle's dense matmul, cuBLAS on CUDA).
    Dense,
}

impl FromStr for GpuWeights {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "quantized" => Ok(Self::Quantized),
            "dense" => Ok(Self::Dense),
            other => Err(format!("GPU weights must be quantized or dense, got `{other}`")),
        }
    }
}

impl fmt::Display for GpuWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quantized => "quantized",
            Self::Dense => "dense",
        })
    }
}

/// A projection weight `[n, k]` (out, in) as the GGUF file's raw blocks.
#[derive(Clone, PartialEq, Eq)]
pub struct GgufBlocks {
    /// The blocks' ggml type.
    pub dtype: GgmlDType,
    /// `n` rows of `k / block_size` blocks each, row-major.
    pub bytes: Vec<u8>,
    /// Output features (rows).
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl fmt::Debug for GgufBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GgufBlocks({:?}, {}x{}, {} bytes)", self.dtype, self.n, self.k, self.bytes.len())
    }
}

impl GgufBlocks {
    /// Whether candle 0.11's CUDA quantized matmul has kernels for `dtype` (`fast_mmvq` and
    /// `fast_mmq`, which take f32, f16 and bf16 activations).
    pub fn supported(dtype: GgmlDType) -> bool {
        use GgmlDType::*;
        matches!(dtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K)
    }

    /// Checks that `bytes` hold exactly `n` rows of `k` weights of `dtype`.
    pub fn new(dtype: GgmlDType, bytes: Vec<u8>, n: usize, k: usize) -> Result<Self> {
        let block = dtype.block_size();
        if !k.is_multiple_of(block) || bytes.len() != n * (k / block) * dtype.type_size() {
            return Err(EngineError::Load(format!(
                "a {dtype:?} tensor of shape [{n}, {k}] cannot have {} bytes",
                bytes.len()
            )));
        }
        Ok(Self { dtype, bytes, n, k })
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.k / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Reorders rows: row `r` of the result is row `from[r]` of `self`.
    pub fn permute_rows(self, from: &[usize]) -> Self {
        let width = self.row_bytes();
        let bytes = from.iter().flat_map(|&r| &self.bytes[r * width..][..width]).copied().collect();
        Self { bytes, ..self }
    }

    /// The rows of `parts` one after another (e.g. Q, K and V into one projection), if they all
    /// share the input width and the ggml type; `None` otherwise.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let first = parts.first()?;
        let (dtype, k) = (first.dtype, first.k);
        if parts.iter().any(|p| p.dtype != dtype || p.k != k) {
            return None;
        }
        let n = parts.iter().map(|p| p.n).sum();
        let bytes = parts.into_iter().flat_map(|p| p.bytes).collect();
        Some(Self { dtype, bytes, n, k })
    }

    /// The blocks as a `[n, k]` `QTensor` on `device`.
    pub fn to_qtensor(&self, device: &Device) -> Result<QTensor> {
        // candle views the bytes as block structs (2- or 4-byte aligned); a u64 buffer guarantees
        // the alignment that a `Vec<u8>` does not.
        let mut words = vec![0u64; self.bytes.len().div_ceil(8)];
        let aligned = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..self.bytes.len()];
        aligned.copy_from_slice(&self.bytes);
        let storage = QStorage::from_data(Cow::Borrowed(aligned), device, self.dtype)?;
        Ok(QTensor::new(storage, (self.n, self.k))?)
    }
}

/// A projection on candle's `QMatMul`: one or more quantized parts of the same input, whose
/// outputs are concatenated (parts of one ggml type are stacked into one; a Q4_K_M file's Q/K in
/// Q4_K and V in Q6_K stay two).
pub struct QLinear {
    parts: Vec<QMatMul>,
}

impl fmt::Debug for QLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| match p {
                QMatMul::QTensor(t) => format!("{:?} {:?}", t.dtype(), t.shape()),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => format!("dense {:?}", t.shape()),
            })
            .collect();
        write!(f, "QLinear({})", parts.join(", "))
    }
}

impl QLinear {
    /// Uploads `parts` (the weights of one input, in output order) to `device`, stacking runs of
    /// the same ggml type.
    pub fn new(parts: Vec<GgufBlocks>, device: &Device) -> Result<Self> {
        let mut runs: Vec<Vec<GgufBlocks>> = Vec::new();
        for part in parts {
            match runs.last_mut() {
                Some(run) if run[0].dtype == part.dtype && run[0].k == part.k => run.push(part),
                _ => runs.push(vec![part]),
            }
        }
        let parts = runs
            .into_iter()
            .map(|run| {
                let blocks =
                    GgufBlocks::stack(run).ok_or_else(|| EngineError::Load("cannot stack quantized weights".into()))?;
                Ok(QMatMul::from_arc(Arc::new(blocks.to_qtensor(device)?))?)
            })
            .collect::<Result<Vec<_>>>()?;
        if parts.is_empty() {
            return Err(EngineError::Load("a projection needs at least one weight".into()));
        }
        Ok(Self { parts })
    }

    /// `x: [n, in] → [n, out]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's quantized kernels read the activations as one contiguous buffer.
        let x = x.contiguous()?;
        match self.parts.as_slice() {
            [one] => Ok(one.forward(&x)?),
            parts => {
                let outs = parts.iter().map(|p| p.forward(&x)).collect::<candle_core::Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outs, 1)?)
            }
        }
    }

    /// Bytes the weights occupy.
    pub fn weight_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
            })
            .sum()
    }

    /// The weight, dequantized to f32 on the CPU, `[out, in]` (for tests and inspection).
    pub fn dequantized(&self) -> Result<Tensor> {
        let parts = self
            .parts
            .iter()
            .map(|p| match p {
                QMatMul::QTensor(t) => t.dequantize(&Device::Cpu),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[rows, 64]` f32 matrix with distinct rows, and its Q8_0 blocks.
    fn q8_0(rows: usize) -> Result<(Tensor, GgufBlocks)> {
        let dense = Tensor::arange(0f32, (rows * 64) as f32, &Device::Cpu)?.reshape((rows, 64))?.affine(0.01, -1.0)?;
        let q = QTensor::quantize(&dense, GgmlDType::Q8_0)?;
        let blocks = GgufBlocks::new(GgmlDType::Q8_0, q.data()?.into_owned(), rows, 64)?;
        Ok((q.dequantize(&Device::Cpu)?, blocks))
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn permuting_and_stacking_block_rows_moves_whole_rows() -> Result<()> {
        let (a, qa) = q8_0(4)?;
        let (b, qb) = q8_0(2)?;
        let order = [2, 0, 3, 1];
        let permuted = qa.clone().permute_rows(&order);
        let got = QLinear::new(vec![permuted, qb.clone()], &Device::Cpu)?.dequantized()?;
        let a_rows = rows(&a);
        let mut want: Vec<Vec<f32>> = order.iter().map(|&r| a_rows[r].clone()).collect();
        want.extend(rows(&b));
        assert_eq!(rows(&got), want);
        assert_eq!(GgufBlocks::stack(vec![qa, qb]).map(|s| s.n), Some(6));
        Ok(())
    }

    #[test]
    fn parts_of_different_types_stay_separate_and_concatenate() -> Result<()> {
        let (a, qa) = q8_0(2)?;
        let dense = Tensor::ones((3, 64), candle_core::DType::F32, &Device::Cpu)?;
        let q4 = QTensor::quantize(&dense, GgmlDType::Q4_1)?;
        let qb = GgufBlocks::new(GgmlDType::Q4_1, q4.data()?.into_owned(), 3, 64)?;
        assert!(GgufBlocks::stack(vec![qa.clone(), qb.clone()]).is_none());
        let linear = QLinear::new(vec![qa, qb], &Device::Cpu)?;
        assert_eq!(linear.parts.len(), 2);
        let x = Tensor::ones((5, 64), candle_core::DType::F32, &Device::Cpu)?;
        assert_eq!(linear.forward(&x)?.dims(), &[5, 5]);
        let want = Tensor::cat(&[a, q4.dequantize(&Device::Cpu)?], 0)?;
        assert_eq!(rows(&linear.dequantized()?), rows(&want));
        Ok(())
    }

    #[test]
    fn sizes_are_checked_and_names_parse() {
        assert!(GgufBlocks::new(GgmlDType::Q8_0, vec![0; 33], 1, 32).is_err());
        assert!(GgufBlocks::new(GgmlDType::Q8_0, vec![0; 34], 1, 33).is_err());
        assert!(GgufBlocks::new(GgmlDType::Q8_0, vec![0; 34], 1, 32).is_ok());
        for s in ["quantized", "dense"] {
            assert_eq!(s.parse::<GpuWeights>().unwrap().to_string(), s);
        }
        assert!("q4".parse::<GpuWeights>().unwrap_err().contains("dense"));
        assert!(GgufBlocks::supported(GgmlDType::Q4K) && !GgufBlocks::supported(GgmlDType::F16));
    }
}
