//! An RMS norm and the projection that reads its output ([`NormedLinear`]): the norm's weight
//! folded into the GEMV's, the residual add, the norm and the product in one launch at small
//! batches, and the epilogues that take the op after the projection into the same launch (an
//! MLP's SwiGLU; an attention's RoPE and KV-cache writes).

use candle_core::Tensor;
use sluice_kernels::gemv::{self, Epilogue};

use super::linear::Linear;
use super::ops;
use crate::error::Result;

#[derive(Debug)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
    // Whether a residual add before the norm is one launch with it (`fused::add_rms_norm`): on
    // the GPU path (see `LoadOptions::gpu_layout`).
    pub(super) fused_add: bool,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// Adds the branch output `y` (if any) to the residual stream `x` in place, then normalises
    /// it. On the GPU path the two are one launch (`sluice_kernels::fused::add_rms_norm`);
    /// elsewhere they stay the separate ops (whose bits the CPU path keeps).
    pub(super) fn add_forward(&self, x: &mut Tensor, y: Option<Tensor>) -> Result<Tensor> {
        match y {
            None => self.forward(x),
            Some(y) if self.fused_add && y.dtype() == x.dtype() && self.weight.dtype() == x.dtype() => {
                let (sum, normed) = sluice_kernels::fused::add_rms_norm(x, &y, &self.weight, self.eps)?;
                *x = sum;
                Ok(normed)
            }
            Some(y) => {
                *x = ops::add(x, &y)?;
                self.forward(x)
            }
        }
    }
}

/// An RMS norm and the projection that reads its output.
///
/// On the GPU path, when small batches take `sluice_kernels::gemv` (a [`Linear::Rows`] with `gemv`),
/// the norm's weight is folded into the projection's at load (`folded`): then up to
/// [`gemv::MAX_NORM_ROWS`] rows take the residual add, the norm and the product in one launch
/// (`gemv::gemv_norm`), and more rows a norm without weight (the add fused in, on CUDA) and the
/// product. Otherwise the norm and the projection run as they are. An MLP's gate/up pair also
/// takes its SwiGLU into the GEMV's launch ([`Epilogue::Swiglu`]).
#[derive(Debug)]
pub(super) struct NormedLinear {
    norm: RmsNorm,
    pub(super) linear: Linear,
    folded: bool,
}

impl NormedLinear {
    /// Folds `norm`'s weight into `linear`'s when `fold` asks and `linear` takes `gemv` (at the
    /// width of its input: otherwise the fold would only round the weight once more).
    pub(super) fn new(norm: RmsNorm, mut linear: Linear, fold: bool) -> Result<Self> {
        let folded = match &mut linear {
            Linear::Rows { w, gemv: true } if fold && gemv::supports(1, w.dim(1)?, w.dtype()) => {
                *w = gemv::fold_norm_weight(w, &norm.weight)?;
                true
            }
            _ => false,
        };
        Ok(Self { norm, linear, folded })
    }

    /// Adds the branch output `y` (if any) to the residual stream `x` in place, normalises it and
    /// projects it; `unit` is a weight of ones for the norm of a folded pair at larger batches.
    /// With [`Epilogue::Swiglu`] the projection is an MLP's gate/up and the result its activation,
    /// `silu(gate) · up` (on the GEMV's rows in the same launch as the product).
    pub(super) fn forward(
        &self,
        x: &mut Tensor,
        y: Option<Tensor>,
        unit: &Tensor,
        epilogue: Epilogue,
    ) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if let Linear::Rows { w, gemv: true } = &self.linear {
            if gemv::supports(m, k, x.dtype()) {
                let fits_norm =
                    self.folded && m <= gemv::MAX_NORM_ROWS && y.as_ref().is_none_or(|y| y.dtype() == x.dtype());
                if fits_norm {
                    let (sum, out) = gemv::gemv_norm_with(x, y.as_ref(), w, self.norm.eps, epilogue)?;
                    if let Some(sum) = sum {
                        *x = sum;
                    }
                    return Ok(out);
                }
                let normed = self.normed(x, y, unit)?;
                return Ok(gemv::gemv_with(&normed, w, epilogue)?);
            }
        }
        let normed = self.normed(x, y, unit)?;
        let out = self.linear.forward(&normed)?;
        match epilogue {
            Epilogue::Store => Ok(out),
            // The exact packed path keeps the kernels' SwiGLU (its own `exp`, the same bits on
            // every instruction set); the others compute candle's expression with the C library's
            // `expf`. (This scalar SwiGLU is ~8% of a step at concurrency 32 on the int8 path, but
            // the kernels' SwiGLU there, last bits apart, flips the default model's near tie on
            // "What is the capital of France?" to a French answer.)
            Epilogue::Swiglu if matches!(self.linear, Linear::Packed(_)) => {
                Ok(sluice_kernels::activation::silu_mul(&out)?)
            }
            Epilogue::Swiglu => ops::silu_mul(&out, out.dim(1)? / 2),
        }
    }

    /// An attention's input norm and QKV projection followed by RoPE and the cache writes, in one
    /// launch (`gemv::gemv_norm_qkv_cache`), when this pair takes it for `x`: its norm folded into
    /// the GEMV's weight, at most [`gemv::MAX_NORM_ROWS`] rows. Then the branch output (if any) is
    /// taken from `y` and added to `x` in place, and q `[m, heads, head_dim]` returned; otherwise
    /// nothing is done and `None` returned.
    pub(super) fn forward_qkv_cache(
        &self,
        x: &mut Tensor,
        y: &mut Option<Tensor>,
        cache: &gemv::QkvCache<'_>,
    ) -> Result<Option<Tensor>> {
        let (m, k) = x.dims2()?;
        let Linear::Rows { w, gemv: true } = &self.linear else { return Ok(None) };
        let fits = self.folded
            && m <= gemv::MAX_NORM_ROWS
            && gemv::supports(m, k, x.dtype())
            && [w.dtype(), cache.cos.dtype(), cache.key_cache.dtype(), cache.value_cache.dtype()] == [x.dtype(); 4]
            && y.as_ref().is_none_or(|y| y.dtype() == x.dtype());
        if !fits {
            return Ok(None);
        }
        let (sum, q) = gemv::gemv_norm_qkv_cache(x, y.take().as_ref(), w, self.norm.eps, cache)?;
        if let Some(sum) = sum {
            *x = sum;
        }
        Ok(Some(q))
    }

    /// The residual add (if `y`) and the norm, with a weight of ones (`unit`) when the norm's own
    /// weight is folded into the projection.
    fn normed(&self, x: &mut Tensor, y: Option<Tensor>, unit: &Tensor) -> Result<Tensor> {
        if self.folded {
            RmsNorm { weight: unit.clone(), eps: self.norm.eps, fused_add: self.norm.fused_add }.add_forward(x, y)
        } else {
            self.norm.add_forward(x, y)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::llama::tests::{max_diff, random};

    /// A norm folded into its projection computes what the norm then the projection do, at every
    /// batch (the one-launch `gemv_norm` up to its rows, a norm of ones and `gemv` or the matmul
    /// above), and leaves the same residual stream.
    #[test]
    fn a_folded_norm_gives_what_the_norm_then_the_projection_give() -> Result<()> {
        let (n, k) = (48, 64);
        let w = random(n, k, 3)?;
        let weight = (random(1, k, 4)?.squeeze(0)?.affine(0.5, 1.0))?;
        let norm = || RmsNorm { weight: weight.clone(), eps: 1e-5, fused_add: false };
        let plain = NormedLinear::new(norm(), Linear::Dense(w.t()?.contiguous()?), true)?;
        let folded = NormedLinear::new(norm(), Linear::Rows { w: w.clone(), gemv: true }, true)?;
        let unfolded = NormedLinear::new(norm(), Linear::Rows { w: w.clone(), gemv: false }, true)?;
        assert!(!plain.folded && folded.folded && !unfolded.folded, "only a gemv weight is folded");
        let unit = Tensor::ones(k, DType::F32, &Device::Cpu)?;
        for m in [1, gemv::MAX_NORM_ROWS, 5, gemv::MAX_ROWS + 4] {
            let (x, r) = (random(m, k, 10 + m as u64)?, random(m, k, 20 + m as u64)?);
            let (mut x_plain, mut x_folded, mut x_unfolded) = (x.clone(), x.clone(), x.clone());
            let want = plain.forward(&mut x_plain, Some(r.clone()), &unit, Epilogue::Store)?;
            let got = folded.forward(&mut x_folded, Some(r.clone()), &unit, Epilogue::Store)?;
            let other = unfolded.forward(&mut x_unfolded, Some(r.clone()), &unit, Epilogue::Store)?;
            assert!(max_diff(&got, &want)? < 1e-4 && max_diff(&other, &want)? < 1e-4, "{m} rows");
            assert_eq!(max_diff(&x_folded, &x_plain)? + max_diff(&x_unfolded, &x_plain)?, 0.0, "{m} rows: x + r");
            // No residual: the stream stays as it was.
            let mut same = x.clone();
            let alone = folded.forward(&mut same, None, &unit, Epilogue::Store)?;
            assert!(
                max_diff(&alone, &plain.forward(&mut x.clone(), None, &unit, Epilogue::Store)?)? < 1e-4,
                "{m} rows, no residual"
            );
            assert_eq!(max_diff(&same, &x)?, 0.0);
        }
        Ok(())
    }

    /// An MLP's gate/up pair with the SwiGLU epilogue gives the projection then `silu(gate) · up`
    /// at every batch and on every path (folded norm in the GEMV's launch, the GEMV after a norm
    /// of ones, the matmul, the plain dense weight), and leaves the same residual stream.
    #[test]
    fn the_swiglu_epilogue_gives_the_projection_then_the_activation() -> Result<()> {
        let (inter, k) = (24, 64);
        let w = random(2 * inter, k, 5)?;
        let weight = (random(1, k, 6)?.squeeze(0)?.affine(0.5, 1.0))?;
        let norm = || RmsNorm { weight: weight.clone(), eps: 1e-5, fused_add: false };
        let plain = NormedLinear::new(norm(), Linear::Dense(w.t()?.contiguous()?), true)?;
        let folded = NormedLinear::new(norm(), Linear::Rows { w: w.clone(), gemv: true }, true)?;
        let unfolded = NormedLinear::new(norm(), Linear::Rows { w: w.clone(), gemv: false }, true)?;
        let unit = Tensor::ones(k, DType::F32, &Device::Cpu)?;
        for m in [1, gemv::MAX_NORM_ROWS, 5, gemv::MAX_ROWS + 4] {
            let (x, r) = (random(m, k, 30 + m as u64)?, random(m, k, 40 + m as u64)?);
            let mut x_want = x.clone();
            let gate_up = plain.forward(&mut x_want, Some(r.clone()), &unit, Epilogue::Store)?;
            let (gate, up) = (gate_up.narrow(1, 0, inter)?, gate_up.narrow(1, inter, inter)?);
            let want = (candle_nn::ops::silu(&gate)? * up)?;
            for (name, pair) in [("plain", &plain), ("folded", &folded), ("unfolded", &unfolded)] {
                let mut x_got = x.clone();
                let got = pair.forward(&mut x_got, Some(r.clone()), &unit, Epilogue::Swiglu)?;
                assert_eq!(got.dims(), [m, inter], "{name}, {m} rows");
                assert!(max_diff(&got, &want)? < 1e-4, "{name}, {m} rows");
                assert_eq!(max_diff(&x_got, &x_want)?, 0.0, "{name}, {m} rows: x + r");
            }
        }
        Ok(())
    }

    /// The one-launch QKV path takes one or two rows of a folded GEMV pair, adds the residual in
    /// place and gives what the projection then `qkv_rope_cache` give (q and both caches); past
    /// two rows, or on another kind of weight, it does nothing and leaves the residual to the
    /// projection.
    #[test]
    fn the_qkv_cache_path_is_the_projection_then_rope_and_the_cache() -> Result<()> {
        let (h, kv, d, k) = (4, 2, 8, 64);
        let w = random((h + 2 * kv) * d, k, 7)?;
        let weight = (random(1, k, 8)?.squeeze(0)?.affine(0.5, 1.0))?;
        let norm = || RmsNorm { weight: weight.clone(), eps: 1e-5, fused_add: false };
        let folded = NormedLinear::new(norm(), Linear::Rows { w: w.clone(), gemv: true }, true)?;
        let dense = NormedLinear::new(norm(), Linear::Dense(w.t()?.contiguous()?), true)?;
        let unit = Tensor::ones(k, DType::F32, &Device::Cpu)?;
        let tables = (random(32, d / 2, 9)?, random(32, d / 2, 10)?);
        let caches = || Tensor::zeros((4, 4, kv, d), DType::F32, &Device::Cpu);
        for m in [1, gemv::MAX_NORM_ROWS, gemv::MAX_NORM_ROWS + 1] {
            let (x, r) = (random(m, k, 50 + m as u64)?, random(m, k, 60 + m as u64)?);
            let positions = Tensor::arange(3u32, 3 + m as u32, &Device::Cpu)?;
            let slots = Tensor::arange(5u32, 5 + m as u32, &Device::Cpu)?;
            let (k_got, v_got, k_want, v_want) = (caches()?, caches()?, caches()?, caches()?);
            let got_cache = gemv::QkvCache {
                cos: &tables.0,
                sin: &tables.1,
                positions: &positions,
                key_cache: &k_got,
                value_cache: &v_got,
                slot_mapping: &slots,
                heads: h,
                kv_heads: kv,
                head_dim: d,
            };
            let (mut x_got, mut pending) = (x.clone(), Some(r.clone()));
            let got = folded.forward_qkv_cache(&mut x_got, &mut pending, &got_cache)?;
            let mut x_dense = x.clone();
            let mut dense_pending = Some(r.clone());
            assert!(dense.forward_qkv_cache(&mut x_dense, &mut dense_pending, &got_cache)?.is_none(), "{m} rows");
            assert!(dense_pending.is_some() && max_diff(&x_dense, &x)? == 0.0, "a dense weight leaves all as it was");
            if m > gemv::MAX_NORM_ROWS {
                assert!(got.is_none() && pending.is_some(), "{m} rows take the projection");
                assert_eq!(max_diff(&x_got, &x)?, 0.0);
                continue;
            }
            let q = got.expect("one or two rows take the one-launch path");
            assert!(pending.is_none(), "the residual was used");
            let mut x_want = x.clone();
            let qkv = dense.forward(&mut x_want, Some(r.clone()), &unit, Epilogue::Store)?;
            let q_want = sluice_kernels::fused::qkv_rope_cache(
                &qkv,
                &tables.0,
                &tables.1,
                &positions,
                &k_want,
                &v_want,
                &slots,
                (h, kv, d),
            )?;
            assert_eq!(max_diff(&x_got, &x_want)?, 0.0, "{m} rows: x + r");
            let flat = |t: &Tensor| t.flatten_all();
            assert!(max_diff(&flat(&q)?, &flat(&q_want)?)? < 1e-4, "{m} rows: q");
            assert!(max_diff(&flat(&k_got)?, &flat(&k_want)?)? < 1e-4, "{m} rows: keys");
            assert!(max_diff(&flat(&v_got)?, &flat(&v_want)?)? < 1e-4, "{m} rows: values");
            assert!(flat(&k_got)?.abs()?.max(0)?.to_scalar::<f32>()? > 0.0, "{m} rows: keys were written");
        }
        Ok(())
    }
}
