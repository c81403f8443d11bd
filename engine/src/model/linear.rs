//! The projections of a layer, `y = x · Wᵀ`, with their weights in the layout each device's
//! kernels read.

use candle_core::{DType, Tensor};

use sluice_kernels::gemv;
use sluice_kernels::matmul::{PackedLinear, QuantizedLinear, WeightFormat};

use super::cpu_weights::CpuWeights;
use super::llama::LoadOptions;
use super::loader::{QuantizedWeight, WeightSource};
use super::qmatmul::{GgufBlocks, QLinear};
use crate::error::Result;

/// A projection `y = x · Wᵀ`.
///
/// On the CPU with f32 activations it runs on `sluice_kernels::matmul::PackedLinear`, whose rows
/// are bit-identical at every batch size (one FMA chain per output, in order over `k`), with the
/// weight stored as f32, bf16 or int8. Elsewhere it is candle's matmul, which on the CPU takes
/// another path for a single row (a difference of about 6e-5 on this model's shapes); a lone row
/// is then run as two identical rows so that it gets exactly the numbers it would get in a batch.
///
/// With int8 activations (`CpuActivations`) an int8 or int4 weight runs on `QuantizedLinear`
/// instead: integer dot products, rows still identical at every batch size.
///
/// Off the CPU (and with `LoadOptions::gpu_layout`) a dense weight stays as stored, `[out, in]`
/// ([`Linear::Rows`]): up to [`gemv::MAX_ROWS`] rows go through `sluice_kernels::gemv` (when
/// `LoadOptions::gemv`), more through cuBLAS on its transpose (as PyTorch's `F.linear`). A row's numbers are then the same
/// at any batch up to eight, and may differ (by rounding) above.
///
/// On CUDA a GGUF weight of a type candle's quantized kernels cover stays quantized, on candle's
/// `QMatMul` ([`QLinear`]), unless `GpuWeights::Dense` asks for dense weights. Those kernels take
/// one path up to 8 rows and another above, so there a row's numbers can depend on the batch.
pub enum Linear {
    /// Packed CPU weight.
    Packed(PackedLinear),
    /// Quantised CPU weight with activations quantised to int8 per step.
    Quantized(QuantizedLinear),
    /// `[in, out]`, contiguous: x `[n, in]` · w_t → `[n, out]`.
    Dense(Tensor),
    /// Off the CPU (or with `LoadOptions::gpu_layout`): `w` `[out, in]`, contiguous, as stored; `gemv` says whether small batches take
    /// `sluice_kernels::gemv`.
    Rows { w: Tensor, gemv: bool },
    /// GGUF blocks on candle's quantized matmul.
    QMatMul(QLinear),
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Packed(p) => write!(f, "Linear::Packed({:?}, {}x{})", p.format(), p.out_features(), p.in_features()),
            Self::Quantized(q) => {
                write!(f, "Linear::Quantized({:?}, {}x{})", q.format(), q.out_features(), q.in_features())
            }
            Self::Dense(w) => write!(f, "Linear::Dense({:?})", w.shape()),
            Self::Rows { w, gemv } => write!(f, "Linear::Rows({:?}, gemv: {gemv})", w.shape()),
            Self::QMatMul(q) => write!(f, "Linear::{q:?}"),
        }
    }
}

impl Linear {
    /// From a Hugging Face weight `[out, in]`; `packed` picks the CPU kernel and its weight format.
    pub fn new(w: &Tensor, packed: Option<WeightFormat>) -> Result<Self> {
        match packed {
            Some(format) => Ok(Self::Packed(PackedLinear::from_tensor(w, format)?)),
            None => Ok(Self::Dense(w.t()?.contiguous()?)),
        }
    }

    /// Concatenates several projections of the same input into one (e.g. Q, K and V).
    pub fn fused(ws: &[Tensor], packed: Option<WeightFormat>) -> Result<Self> {
        Self::new(&Tensor::cat(ws, 0)?, packed)
    }

    /// Loads the projections `names` (Hugging Face names, one input) as one layer. On the packed
    /// CPU path `CpuWeights::Native` keeps GGUF Q4_1/Q8_0 weights as they are stored when every part
    /// has the same quantisation, and bf16 safetensors as bf16; otherwise the weight is read dense.
    ///
    /// With `options.quantized_matmul` every part that [`WeightSource::get_blocks`] gives keeps
    /// its GGUF blocks on candle's `QMatMul`; if any part has no such blocks, all are read dense.
    pub(super) fn load(source: &mut WeightSource, names: &[String], options: &LoadOptions) -> Result<Self> {
        if options.quantized_matmul {
            let parts: Option<Vec<GgufBlocks>> =
                names.iter().map(|name| source.get_blocks(name)).collect::<Result<_>>()?;
            if let Some(parts) = parts {
                return Ok(Self::QMatMul(QLinear::new(parts, &options.device)?));
            }
        }
        let packed = options.device.is_cpu() && !options.gpu_layout && options.dtype == DType::F32;
        let int8 = options.cpu_activations.int8();
        let format = match (packed, options.cpu_weights) {
            (false, _) => None,
            (true, CpuWeights::Repack(format)) => Some(format),
            (true, CpuWeights::Native) => {
                let parts: Option<Vec<QuantizedWeight>> =
                    names.iter().map(|name| source.get_quantized(name)).collect::<Result<_>>()?;
                if let Some(w) = parts.and_then(QuantizedWeight::stack) {
                    return Ok(if int8 {
                        Self::Quantized(QuantizedLinear::from_quantized(&w.weight, w.n, w.k)?)
                    } else {
                        Self::Packed(PackedLinear::from_quantized(&w.weight, w.n, w.k)?)
                    });
                }
                let all_bf16 = names.iter().all(|name| source.stored_dtype(name) == Some(DType::BF16));
                Some(if all_bf16 { WeightFormat::Bf16 } else { WeightFormat::F32 })
            }
        };
        let ws =
            names.iter().map(|name| source.get(name, options.dtype, &options.device)).collect::<Result<Vec<_>>>()?;
        if !options.device.is_cpu() || options.gpu_layout {
            let w = match ws.as_slice() {
                [w] => w.contiguous()?,
                _ => Tensor::cat(&ws, 0)?,
            };
            return Ok(Self::Rows { w, gemv: options.gemv });
        }
        if let (true, Some(format @ (WeightFormat::Int8 | WeightFormat::Int4))) = (int8, format) {
            let w = match ws.as_slice() {
                [w] => w.clone(),
                _ => Tensor::cat(&ws, 0)?,
            };
            return Ok(Self::Quantized(QuantizedLinear::from_tensor(&w, format)?));
        }
        match ws.as_slice() {
            [w] => Self::new(w, format),
            _ => Self::fused(&ws, format),
        }
    }

    /// `x: [n, in] → [n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(p) => Ok(p.forward(x)?),
            Self::Quantized(q) => Ok(q.forward(x)?),
            Self::QMatMul(q) => q.forward(x),
            Self::Dense(w_t) => {
                // On the CPU a single row goes through gemm as two, so that it takes the same
                // kernel as when batched; a GPU's BLAS promises no such thing, and there it would
                // cost two more launches per projection.
                if x.dim(0)? == 1 && x.device().is_cpu() {
                    let two = Tensor::cat(&[x, x], 0)?;
                    return Ok(two.matmul(w_t)?.narrow(0, 0, 1)?);
                }
                Ok(x.matmul(w_t)?)
            }
            Self::Rows { w, gemv: true } if gemv::supports(x.dim(0)?, x.dim(1)?, x.dtype()) => Ok(gemv::gemv(x, w)?),
            Self::Rows { w, .. } => Ok(x.matmul(&w.t()?)?),
        }
    }

    /// Bytes the weight occupies.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Self::Packed(p) => p.weight_bytes(),
            Self::Quantized(q) => q.weight_bytes(),
            Self::Dense(w) | Self::Rows { w, .. } => w.elem_count() * w.dtype().size_in_bytes(),
            Self::QMatMul(q) => q.weight_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tests::{max_diff, random};

    /// A weight kept as stored (the layout used off the CPU) gives the transposed weight's products
    /// at every batch, through `gemv` up to its row limit when asked and the matmul otherwise.
    #[test]
    fn stored_weights_take_gemv_up_to_its_rows_and_the_matmul_above() -> Result<()> {
        let w = random(40, 64, 1)?;
        let dense = Linear::Dense(w.t()?.contiguous()?);
        let with_gemv = Linear::Rows { w: w.clone(), gemv: true };
        let without = Linear::Rows { w: w.clone(), gemv: false };
        for m in [1, 5, gemv::MAX_ROWS, gemv::MAX_ROWS + 1, 12] {
            let x = random(m, 64, 2 + m as u64)?;
            let want = dense.forward(&x)?;
            let (a, b) = (with_gemv.forward(&x)?, without.forward(&x)?);
            assert!(max_diff(&a, &want)? < 1e-4 && max_diff(&b, &want)? < 1e-4, "{m} rows");
            let by_gemv = gemv::gemv(&x, &w).ok();
            let by_matmul = x.matmul(&w.t()?)?;
            if m <= gemv::MAX_ROWS {
                assert_eq!(max_diff(&a, by_gemv.as_ref().expect("gemv takes these rows"))?, 0.0, "{m} rows: gemv");
            } else {
                assert!(by_gemv.is_none(), "{m} rows are past gemv's limit");
                assert_eq!(max_diff(&a, &by_matmul)?, 0.0, "{m} rows: matmul");
            }
            assert_eq!(max_diff(&b, &by_matmul)?, 0.0, "{m} rows without gemv: matmul");
        }
        Ok(())
    }
}
