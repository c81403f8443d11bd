//! `silu_mul`: the SwiGLU activation `silu(gate) * up` on the CPU, from the fused gate/up
//! projection's output, in one pass.
//!
//! `silu(x) = x * sigmoid(x)` with `sigmoid` computed from `t = exp(-|x|)` (never overflowing):
//! `1 / (1 + t)` for `x >= 0`, `t / (1 + t)` otherwise; `exp` is the attention's polynomial. The
//! portable and AVX-512 bodies do the same operations in the same order, so they give the same
//! bits, and every element is computed alone, so a row's result never depends on the batch.

use candle_core::{bail, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::attention::cpu::exp;
use crate::storage::contiguous_slice;

/// Rows per rayon task: small batches run on one thread.
const ROWS_PER_TASK: usize = 16;

/// `[n, 2 * i]` (gate, then up, per row) f32 on the CPU → `[n, i]` of `silu(gate) * up`.
///
/// Errors if `gate_up` is not 2-D f32 on the CPU with an even width.
pub fn silu_mul(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    let (n, width) = gate_up.dims2()?;
    if width % 2 != 0 {
        bail!("`gate_up` must have an even width, got {width}")
    }
    if gate_up.dtype() != DType::F32 || !gate_up.device().is_cpu() {
        bail!("`gate_up` must be f32 on the CPU")
    }
    let gate_up = gate_up.contiguous()?;
    let (storage, layout) = gate_up.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("`gate_up` must be on the CPU") };
    let xs = contiguous_slice::<f32>(cpu, layout, "gate_up")?;
    let i = width / 2;
    let mut out = vec![0.0f32; n * i];
    if i > 0 {
        out.par_chunks_mut(ROWS_PER_TASK * i).zip(xs.par_chunks(ROWS_PER_TASK * width)).for_each(|(out, xs)| {
            for (out, row) in out.chunks_exact_mut(i).zip(xs.chunks_exact(width)) {
                let (gate, up) = row.split_at(i);
                rows(gate, up, out);
            }
        });
    }
    Tensor::from_vec(out, (n, i), &Device::Cpu)
}

/// One row, on the fastest body this CPU has.
fn rows(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above.
        return unsafe { avx512::row(gate, up, out) };
    }
    gate.iter().zip(up).zip(out.iter_mut()).for_each(|((&g, &u), o)| *o = silu(g) * u);
}

/// `x * sigmoid(x)`, as the module docs define it.
#[inline(always)]
fn silu(x: f32) -> f32 {
    let t = exp(-x.abs());
    let sigmoid = if x >= 0.0 { 1.0 / (1.0 + t) } else { t / (1.0 + t) };
    x * sigmoid
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::attention::cpu::avx512::exp;

    /// `out = silu(gate) * up`, sixteen lanes at a time. Safety: AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = gate.len().min(up.len()).min(out.len());
        let full = n / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for j in (0..full).step_by(16) {
            let x = _mm512_loadu_ps(gate.as_ptr().add(j));
            let t = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
            let denom = _mm512_add_ps(one, t);
            let positive = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_setzero_ps());
            let sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(positive, t, one), denom);
            let silu = _mm512_mul_ps(x, sigmoid);
            _mm512_storeu_ps(out.as_mut_ptr().add(j), _mm512_mul_ps(silu, _mm512_loadu_ps(up.as_ptr().add(j))));
        }
        for j in full..n {
            out[j] = super::silu(gate[j]) * up[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_and_is_exact_across_bodies() -> candle_core::Result<()> {
        let (n, i) = (5, 37);
        let data: Vec<f32> = (0..n * 2 * i).map(|k| ((k * 7919) % 2001) as f32 / 100.0 - 10.0).collect();
        let got = silu_mul(&Tensor::from_vec(data.clone(), (n, 2 * i), &Device::Cpu)?)?.to_vec2::<f32>()?;
        for (r, row) in got.iter().enumerate() {
            for (j, &y) in row.iter().enumerate() {
                let (g, u) = (f64::from(data[r * 2 * i + j]), f64::from(data[r * 2 * i + i + j]));
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((f64::from(y) - want).abs() <= 1e-6 * want.abs().max(1.0), "{r},{j}: {y} vs {want}");
                // The portable body, element by element.
                assert_eq!(y.to_bits(), (silu(g as f32) * u as f32).to_bits(), "{r},{j}");
            }
        }
        assert!(silu_mul(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?).is_err(), "odd width");
        assert!(silu_mul(&Tensor::zeros((2, 4), DType::F64, &Device::Cpu)?).is_err(), "f64");
        Ok(())
    }
}
