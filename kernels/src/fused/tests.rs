use candle_core::{DType, Device, Result, Tensor, D};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::test_util::{test_device, uniform};

/// Largest |a - b| over all elements, in f32.
fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()
}

/// Half a unit in the last place of values near 1, with room for candle rounding each step.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// Against candle's split (narrow + contiguous) and the rotation written out, for the three
/// dtypes and a few shapes.
fn qkv_rope_matches_candle(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, h, kv, d) in [(1, 9, 3, 64), (5, 4, 2, 8), (33, 32, 8, 64), (3, 2, 1, 128)] {
            let qkv = uniform(&mut rng, &[n, (h + 2 * kv) * d], dtype, dev)?;
            let cos = uniform(&mut rng, &[n, d / 2], dtype, dev)?;
            let sin = uniform(&mut rng, &[n, d / 2], dtype, dev)?;
            let (q, k, v) = qkv_rope(&qkv, &cos, &sin, h, kv, d)?;
            assert_eq!((q.dims(), k.dims(), v.dims()), (&[n, h, d][..], &[n, kv, d][..], &[n, kv, d][..]));
            let want_q = qkv.narrow(1, 0, h * d)?.reshape((1, n, h, d))?.contiguous()?;
            let want_k = qkv.narrow(1, h * d, kv * d)?.reshape((1, n, kv, d))?.contiguous()?;
            let want_q = rope_reference(&want_q, &cos, &sin)?.reshape((n, h, d))?;
            let want_k = rope_reference(&want_k, &cos, &sin)?.reshape((n, kv, d))?;
            let want_v = qkv.narrow(1, (h + kv) * d, kv * d)?.reshape((n, kv, d))?;
            let tol = tolerance(dtype);
            for (name, got, want) in [("q", &q, &want_q), ("k", &k, &want_k)] {
                let diff = max_diff(got, want)?;
                assert!(diff <= tol, "{dtype:?} {name} ({n}, {h}, {kv}, {d}): off by {diff}");
            }
            // v is copied, bit for bit.
            assert_eq!(max_diff(&v, &want_v)?, 0.0, "{dtype:?} v");
        }
    }
    Ok(())
}
test_device!(qkv_rope_matches_candle);

/// The fused op against the ops it stands for (tables gathered, `qkv_rope`, `reshape_and_cache`),
/// bit for bit: q, and both caches, padding rows and shuffled slots included.
fn qkv_rope_cache_is_qkv_rope_then_reshape_and_cache(dev: &Device) -> Result<()> {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(8);
    let (num_blocks, block_size, max_positions) = (12, 4, 300);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, h, kv, d) in [(1, 9, 3, 64), (5, 4, 2, 8), (33, 32, 8, 64), (3, 2, 1, 128)] {
            let qkv = uniform(&mut rng, &[n, (h + 2 * kv) * d], dtype, dev)?;
            let cos = uniform(&mut rng, &[max_positions, d / 2], dtype, dev)?;
            let sin = uniform(&mut rng, &[max_positions, d / 2], dtype, dev)?;
            let positions: Vec<u32> = (0..n).map(|_| rng.random_range(0..max_positions as u32)).collect();
            let mut slots: Vec<u32> = (0..(num_blocks * block_size) as u32).collect();
            slots.shuffle(&mut rng);
            slots.truncate(n);
            if n > 1 {
                slots[n / 2] = crate::PAD_SLOT;
            }
            let positions = Tensor::new(positions, dev)?;
            let slot_mapping = Tensor::new(slots, dev)?;
            let k_cache = uniform(&mut rng, &[num_blocks, block_size, kv, d], dtype, dev)?;
            let v_cache = uniform(&mut rng, &[num_blocks, block_size, kv, d], dtype, dev)?;
            let (k_want, v_want) = (k_cache.copy()?, v_cache.copy()?);

            let q = qkv_rope_cache(&qkv, &cos, &sin, &positions, &k_cache, &v_cache, &slot_mapping, (h, kv, d))?;
            let (cos_rows, sin_rows) = (cos.index_select(&positions, 0)?, sin.index_select(&positions, 0)?);
            let (q_want, k, v) = qkv_rope(&qkv, &cos_rows, &sin_rows, h, kv, d)?;
            crate::reshape_and_cache(&k, &v, &k_want, &v_want, &slot_mapping)?;
            let what = format!("{dtype:?} ({n}, {h}, {kv}, {d})");
            assert_eq!(q.dims(), [n, h, d], "{what}");
            for (name, got, want) in
                [("q", &q, &q_want), ("k cache", &k_cache, &k_want), ("v cache", &v_cache, &v_want)]
            {
                assert_eq!(max_diff(got, want)?, 0.0, "{what}: {name}");
            }
        }
    }
    Ok(())
}
test_device!(qkv_rope_cache_is_qkv_rope_then_reshape_and_cache);

/// Operands that do not fit are refused; on the CPU a position past the tables is an error
/// that leaves the caches as they were.
fn qkv_rope_cache_refuses_what_does_not_fit(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let (h, kv, d) = (4, 2, 8);
    let qkv = uniform(&mut rng, &[2, (h + 2 * kv) * d], DType::F32, dev)?;
    let cos = uniform(&mut rng, &[16, d / 2], DType::F32, dev)?;
    let sin = uniform(&mut rng, &[16, d / 2], DType::F32, dev)?;
    let k_cache = uniform(&mut rng, &[4, 4, kv, d], DType::F32, dev)?;
    let v_cache = uniform(&mut rng, &[4, 4, kv, d], DType::F32, dev)?;
    let slots = Tensor::new(&[3u32, 9], dev)?;
    let ok = Tensor::new(&[1u32, 15], dev)?;
    let call = |qkv: &Tensor, positions: &Tensor, slots: &Tensor, dims| {
        qkv_rope_cache(qkv, &cos, &sin, positions, &k_cache, &v_cache, slots, dims)
    };
    assert!(call(&qkv, &ok, &slots, (h, kv, 2 * d)).is_err(), "qkv too narrow for the heads");
    assert!(call(&qkv, &Tensor::new(&[1u32], dev)?, &slots, (h, kv, d)).is_err(), "one position for two rows");
    assert!(call(&qkv, &ok, &Tensor::new(&[1f32, 2.], dev)?, (h, kv, d)).is_err(), "f32 slots");
    assert!(call(&qkv.to_dtype(DType::BF16)?, &ok, &slots, (h, kv, d)).is_err(), "dtypes differ");
    if dev.is_cpu() {
        let before = (k_cache.copy()?, v_cache.copy()?);
        assert!(call(&qkv, &Tensor::new(&[1u32, 16], dev)?, &slots, (h, kv, d)).is_err(), "past the tables");
        assert!(call(&qkv, &ok, &Tensor::new(&[3u32, 16], dev)?, (h, kv, d)).is_err(), "slot out of range");
        assert_eq!(max_diff(&k_cache, &before.0)? + max_diff(&v_cache, &before.1)?, 0.0, "caches untouched");
    }
    assert_eq!(call(&qkv, &ok, &slots, (h, kv, d))?.dims(), [2, h, d]);
    Ok(())
}
test_device!(qkv_rope_cache_refuses_what_does_not_fit);

/// What candle-nn's `rope_thd` computes over `(b, t, h, d)` with `(t, d / 2)` tables, written
/// out in f32 tensor ops (this crate does not depend on candle-nn): pairs (i, i + d/2) rotated.
/// The engine-level check against candle-nn and transformers is the GPU proof's logits step.
fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    let half = d / 2;
    let x = x.to_dtype(DType::F32)?;
    let cos = cos.to_dtype(DType::F32)?.reshape((1, t, 1, half))?;
    let sin = sin.to_dtype(DType::F32)?.reshape((1, t, 1, half))?;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], 3)
}

/// Against `silu(gate) * up` computed in f32 by candle's ops.
fn swiglu_matches_candle(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, inter) in [(1, 1536), (7, 40), (64, 8192)] {
            let gate_up = (uniform(&mut rng, &[n, 2 * inter], dtype, dev)? * 6.0)?;
            let got = swiglu(&gate_up)?;
            assert_eq!(got.dims(), [n, inter]);
            let x = gate_up.to_dtype(DType::F32)?;
            let (g, u) = (x.narrow(1, 0, inter)?, x.narrow(1, inter, inter)?);
            let want = ((&g / (g.neg()?.exp()? + 1.0)?)? * &u)?;
            let diff = max_diff(&got, &want)?;
            // Outputs reach |6 * 6|: the element type's relative rounding at that size.
            let tol = 40.0 * tolerance(dtype);
            assert!(diff <= tol, "{dtype:?} ({n}, {inter}): off by {diff}");
        }
    }
    Ok(())
}
test_device!(swiglu_matches_candle);

/// Against candle's add, then candle-nn's `rms_norm` written out in f32 (as `rms_norm_slow`).
fn add_rms_norm_matches_candle(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, hidden) in [(1, 2048), (5, 576), (37, 64), (2, 3000)] {
            let x = (uniform(&mut rng, &[n, hidden], dtype, dev)? * 4.0)?;
            let y = uniform(&mut rng, &[n, hidden], dtype, dev)?;
            let w = uniform(&mut rng, &[hidden], dtype, dev)?;
            let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-5)?;
            let want_sum = (&x + &y)?;
            assert_eq!(max_diff(&sum, &want_sum)?, 0.0, "{dtype:?} ({n}, {hidden}) sum");
            let s = want_sum.to_dtype(DType::F32)?;
            let mean = (s.sqr()?.sum_keepdim(1)? / hidden as f64)?;
            let want = s.broadcast_div(&(mean + 1e-5)?.sqrt()?)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
            let diff = max_diff(&normed, &want)?;
            // Normed values reach a few units: the dtype's rounding there.
            let tol = 4.0 * tolerance(dtype);
            assert!(diff <= tol, "{dtype:?} ({n}, {hidden}): off by {diff}");
        }
    }
    Ok(())
}
test_device!(add_rms_norm_matches_candle);

fn bad_arguments_are_errors(dev: &Device) -> Result<()> {
    let x = Tensor::zeros((2, 5 * 8), DType::F32, dev)?;
    let cs = Tensor::zeros((2, 4), DType::F32, dev)?;
    assert!(qkv_rope(&x, &cs, &cs, 4, 1, 8).is_err(), "width");
    assert!(qkv_rope(&x, &cs.to_dtype(DType::F16)?, &cs, 3, 1, 8).is_err(), "dtype");
    assert!(qkv_rope(&x, &cs.narrow(1, 0, 2)?, &cs, 3, 1, 8).is_err(), "cos shape");
    assert!(swiglu(&Tensor::zeros((2, 7), DType::F32, dev)?).is_err(), "odd width");
    let w = Tensor::zeros(40, DType::F32, dev)?;
    assert!(add_rms_norm(&x, &x, &w.narrow(0, 0, 39)?, 1e-5).is_err(), "weight length");
    assert!(add_rms_norm(&x, &x.to_dtype(DType::F16)?, &w, 1e-5).is_err(), "dtype");
    assert!(swiglu(&Tensor::zeros((2, 8), DType::U32, dev)?).is_err(), "dtype");
    // No rows: an empty result, nothing launched.
    let empty = Tensor::zeros((1, 8), DType::F32, dev)?.narrow(0, 0, 0)?;
    assert_eq!(swiglu(&empty)?.dims(), [0, 4]);
    Ok(())
}
test_device!(bad_arguments_are_errors);
