//! The Llama forward's small elementwise steps, fused into single passes for f32 tensors on the
//! CPU: the split of the fused QKV projection with the rotary embedding, the SwiGLU activation and
//! the residual add.
//!
//! Each fused body does exactly the arithmetic, in the same order, of the candle ops it stands for
//! (`narrow` + `contiguous` + `rope_thd`, `silu` then `*`, `+`), so its results are the same bits. What the fusion
//! saves is the intermediate tensors and their copies, and candle's elementwise thread pool, whose
//! threads compete with the kernels' rayon threads for the cores. Other dtypes and devices take
//! the candle ops.

use candle_core::{DType, Device, Layout, Module, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Whether `t` is f32 on the CPU, where the fused bodies run.
fn cpu_f32(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

/// The elements of a contiguous f32 CPU tensor, from its `storage_and_layout()`.
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(EngineError::Model("expected a CPU tensor".into()));
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| EngineError::Model("expected a contiguous tensor".into()))?;
    Ok(&data[start..end])
}

/// Splits `qkv: [n, (heads + 2 kv_heads) * head_dim]` into `q: [n, heads, head_dim]`,
/// `k: [n, kv_heads, head_dim]` (both rotated by `cos`/`sin: [n, head_dim / 2]`, half-split layout)
/// and `v: [n, kv_heads, head_dim]`. On the CPU (f32) the same bits as `narrow` + `contiguous` +
/// `rope_thd`; on CUDA one fused launch (`sluice_kernels::fused::qkv_rope`, rounded once, so within
/// the dtype's rounding of `rope_thd`, which rounds after each step) instead of five.
pub(crate) fn qkv_rope(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let n = qkv.dim(0)?;
    let (h, kv, d) = (heads, kv_heads, head_dim);
    if qkv.device().is_cuda() && d.is_multiple_of(2) && cos.dtype() == qkv.dtype() && sin.dtype() == qkv.dtype() {
        return Ok(sluice_kernels::fused::qkv_rope(qkv, cos, sin, h, kv, d)?);
    }
    let fused = cpu_f32(qkv) && cpu_f32(cos) && cpu_f32(sin) && d.is_multiple_of(2);
    if !fused {
        let q = qkv.narrow(1, 0, h * d)?.reshape((1, n, h, d))?.contiguous()?;
        let k = qkv.narrow(1, h * d, kv * d)?.reshape((1, n, kv, d))?.contiguous()?;
        let v = qkv.narrow(1, (h + kv) * d, kv * d)?.reshape((n, kv, d))?.contiguous()?;
        let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.reshape((n, h, d))?;
        let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.reshape((n, kv, d))?;
        return Ok((q, k, v));
    }
    let width = (h + 2 * kv) * d;
    let half = d / 2;
    if qkv.dims2()? != (n, width) || cos.dims2()? != (n, half) || sin.dims2()? != (n, half) {
        return Err(EngineError::Model(format!(
            "qkv_rope: shapes {:?}, {:?}, {:?} do not fit {h} + 2 × {kv} heads of {d}",
            qkv.shape(),
            cos.shape(),
            sin.shape()
        )));
    }
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (mut q, mut k, mut v) = (vec![0.0f32; n * h * d], vec![0.0f32; n * kv * d], vec![0.0f32; n * kv * d]);
    let ((qkv_s, qkv_l), (cos_s, cos_l), (sin_s, sin_l)) =
        (qkv.storage_and_layout(), cos.storage_and_layout(), sin.storage_and_layout());
    let (qkv, cos, sin) = (f32_slice(&qkv_s, qkv_l)?, f32_slice(&cos_s, cos_l)?, f32_slice(&sin_s, sin_l)?);
    let rows = qkv.chunks_exact(width).zip(cos.chunks_exact(half).zip(sin.chunks_exact(half)));
    let outs = q.chunks_exact_mut(h * d).zip(k.chunks_exact_mut(kv * d).zip(v.chunks_exact_mut(kv * d)));
    for ((row, (cos, sin)), (q, (k, v))) in rows.zip(outs) {
        let (row_q, rest) = row.split_at(h * d);
        let (row_k, row_v) = rest.split_at(kv * d);
        for (x, out) in row_q.chunks_exact(d).zip(q.chunks_exact_mut(d)) {
            rope_head(x, cos, sin, out);
        }
        for (x, out) in row_k.chunks_exact(d).zip(k.chunks_exact_mut(d)) {
            rope_head(x, cos, sin, out);
        }
        v.copy_from_slice(row_v);
    }
    Ok((
        Tensor::from_vec(q, (n, h, d), &Device::Cpu)?,
        Tensor::from_vec(k, (n, kv, d), &Device::Cpu)?,
        Tensor::from_vec(v, (n, kv, d), &Device::Cpu)?,
    ))
}

/// One head of the rotary embedding, half-split layout, with `rope_thd`'s expressions:
/// `out[i] = x[i]·cos[i] − x[i + d/2]·sin[i]` and `out[i + d/2] = x[i]·sin[i] + x[i + d/2]·cos[i]`.
#[inline]
fn rope_head(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half.min(cos.len()).min(sin.len()) {
        o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
    }
}

/// `gate_up: [n, 2 * intermediate]` (gate, then up, per row) → `silu(gate) * up: [n, intermediate]`
/// with candle's `silu` expression (`x / (1 + exp(-x))`, the C library's `expf`): the same bits as
/// `Activation::Silu` on the gate followed by `*` with the up half, in one pass, rows split over
/// rayon for large batches. On CUDA, `sluice_kernels::fused::swiglu` (one launch, rounded once).
pub(crate) fn silu_mul(gate_up: &Tensor, intermediate: usize) -> Result<Tensor> {
    let i = intermediate;
    if gate_up.device().is_cuda() && gate_up.dim(1)? == 2 * i {
        // One launch instead of two narrows, a `silu` and a product.
        return Ok(sluice_kernels::fused::swiglu(gate_up)?);
    }
    if !cpu_f32(gate_up) || i == 0 {
        let (gate, up) = (gate_up.narrow(1, 0, i)?, gate_up.narrow(1, i, i)?);
        return Ok((candle_nn::Activation::Silu.forward(&gate)? * up)?);
    }
    let (n, width) = gate_up.dims2()?;
    if width != 2 * i {
        return Err(EngineError::Model(format!("silu_mul: width {width} is not 2 × {i}")));
    }
    let gate_up = gate_up.contiguous()?;
    let mut out = vec![0.0f32; n * i];
    {
        let (storage, layout) = gate_up.storage_and_layout();
        let xs = f32_slice(&storage, layout)?;
        let rows = |(out, row): (&mut [f32], &[f32])| {
            let (gate, up) = row.split_at(i);
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        };
        if n * i >= 1 << 14 {
            out.par_chunks_mut(i).zip(xs.par_chunks(width)).for_each(rows);
        } else {
            out.chunks_mut(i).zip(xs.chunks(width)).for_each(rows);
        }
    }
    Ok(Tensor::from_vec(out, (n, i), &Device::Cpu)?)
}

/// `x + y` for tensors of one shape: on the CPU in f32, one single-threaded pass (the sums are the
/// same bits as candle's `+`).
pub(crate) fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if !(cpu_f32(x) && cpu_f32(y)) || x.shape() != y.shape() {
        return Ok((x + y)?);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let sum: Vec<f32> = {
        let ((x_s, x_l), (y_s, y_l)) = (x.storage_and_layout(), y.storage_and_layout());
        let (xs, ys) = (f32_slice(&x_s, x_l)?, f32_slice(&y_s, y_l)?);
        xs.iter().zip(ys).map(|(a, b)| a + b).collect()
    };
    Ok(Tensor::from_vec(sum, x.shape(), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-8, 8], with a few exact zeros, large and tiny magnitudes,
    /// and infinities, to exercise every branch of the elementwise code.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                match i % 97 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => 90.0,
                    3 => -110.0,
                    4 => 1e-30,
                    5 if seed.is_multiple_of(2) => f32::INFINITY,
                    6 if seed.is_multiple_of(2) => f32::NEG_INFINITY,
                    _ => (u - 0.5) * 16.0,
                }
            })
            .collect()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    fn tensor(len: usize, shape: (usize, usize), seed: u64) -> Tensor {
        Tensor::from_vec(values(len, seed), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn qkv_rope_is_bit_identical_to_narrow_and_rope_thd() {
        let (h, kv, d) = (9, 3, 64);
        for n in [1, 2, 7, 33] {
            let qkv = tensor(n * (h + 2 * kv) * d, (n, (h + 2 * kv) * d), n as u64 + 1);
            let cos = tensor(n * d / 2, (n, d / 2), 100 + n as u64).cos().unwrap();
            let sin = tensor(n * d / 2, (n, d / 2), 200 + n as u64).sin().unwrap();
            let (q, k, v) = qkv_rope(&qkv, &cos, &sin, (h, kv, d)).unwrap();
            assert_eq!((q.dims(), k.dims(), v.dims()), (&[n, h, d][..], &[n, kv, d][..], &[n, kv, d][..]));
            let want_q = qkv.narrow(1, 0, h * d).unwrap().reshape((1, n, h, d)).unwrap().contiguous().unwrap();
            let want_k = qkv.narrow(1, h * d, kv * d).unwrap().reshape((1, n, kv, d)).unwrap().contiguous().unwrap();
            let want_v = qkv.narrow(1, (h + kv) * d, kv * d).unwrap();
            let want_q = candle_nn::rotary_emb::rope_thd(&want_q, &cos, &sin).unwrap();
            let want_k = candle_nn::rotary_emb::rope_thd(&want_k, &cos, &sin).unwrap();
            assert_eq!(bits(&q), bits(&want_q), "q, n={n}");
            assert_eq!(bits(&k), bits(&want_k), "k, n={n}");
            assert_eq!(bits(&v), bits(&want_v), "v, n={n}");
        }
    }

    #[test]
    fn qkv_rope_rejects_mismatched_shapes() {
        let qkv = tensor(2 * 5 * 4, (2, 5 * 4), 1);
        let cs = tensor(2 * 2, (2, 2), 2);
        assert!(qkv_rope(&qkv, &cs, &cs, (3, 1, 4)).is_ok());
        assert!(qkv_rope(&qkv, &cs, &cs, (2, 1, 4)).is_err(), "width");
        assert!(qkv_rope(&qkv, &tensor(3 * 2, (3, 2), 2), &cs, (3, 1, 4)).is_err(), "cos rows");
    }

    #[test]
    fn silu_mul_is_bit_identical_to_candle_silu_times_up() {
        for (n, i) in [(1, 1536), (3, 37), (40, 1536)] {
            let gate_up = tensor(n * 2 * i, (n, 2 * i), (n * i) as u64);
            let got = silu_mul(&gate_up, i).unwrap();
            assert_eq!(got.dims(), [n, i]);
            let (gate, up) = (gate_up.narrow(1, 0, i).unwrap(), gate_up.narrow(1, i, i).unwrap());
            let want = (candle_nn::Activation::Silu.forward(&gate).unwrap() * up).unwrap();
            assert_eq!(bits(&got), bits(&want), "n={n}, i={i}");
        }
        assert!(silu_mul(&tensor(6, (2, 3), 0), 1).is_err(), "width is not 2 × intermediate");
    }

    #[test]
    fn add_is_bit_identical_to_candle_add() {
        for (n, w) in [(1, 576), (64, 576), (3, 5)] {
            let (x, y) = (tensor(n * w, (n, w), 3), tensor(n * w, (n, w), 4));
            let got = add(&x, &y).unwrap();
            assert_eq!(got.dims(), [n, w]);
            assert_eq!(bits(&got), bits(&(&x + &y).unwrap()), "{n}x{w}");
        }
        // Shapes that do not match take candle's `+`, and its error.
        assert!(add(&tensor(4, (2, 2), 1), &tensor(6, (2, 3), 2)).is_err());
    }

    #[test]
    fn other_dtypes_take_the_candle_ops() {
        let (h, kv, d, n) = (2, 1, 4, 3);
        let qkv = tensor(n * (h + 2 * kv) * d, (n, (h + 2 * kv) * d), 5).to_dtype(DType::F64).unwrap();
        let cs = tensor(n * d / 2, (n, d / 2), 6).to_dtype(DType::F64).unwrap();
        let (q, _, v) = qkv_rope(&qkv, &cs, &cs, (h, kv, d)).unwrap();
        assert_eq!((q.dtype(), q.dims(), v.dims()), (DType::F64, &[n, h, d][..], &[n, kv, d][..]));
        let x = tensor(n * 8, (n, 8), 7).to_dtype(DType::F64).unwrap();
        assert_eq!(silu_mul(&x, 4).unwrap().dims(), [n, 4]);
        assert_eq!(add(&x, &x).unwrap().dtype(), DType::F64);
    }
}
