use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::test_util::{test_device, uniform};

/// `x · wᵀ` in f64 on the host, from the (rounded) operands.
fn reference(x: &Tensor, w: &Tensor) -> Result<Vec<Vec<f64>>> {
    let x = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let w = w.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok(x.iter().map(|row| w.iter().map(|col| row.iter().zip(col).map(|(a, b)| a * b).sum()).collect()).collect())
}

/// ‖got − want‖ / ‖want‖ (infinite if `got` has a NaN or the wrong shape).
fn relative_error(got: &Tensor, want: &[Vec<f64>]) -> Result<f64> {
    let got = got.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    if got.len() != want.len() || got.iter().zip(want).any(|(g, w)| g.len() != w.len()) {
        return Ok(f64::INFINITY);
    }
    let (mut diff, mut norm) = (0.0, 0.0);
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        if g.is_nan() {
            return Ok(f64::INFINITY);
        }
        diff += (g - w) * (g - w);
        norm += w * w;
    }
    Ok((diff / norm).sqrt())
}

/// Each output rounded once to the dtype, sums in f32.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 8e-3,
    }
}

/// Against an f64 reference, for the three dtypes, every row count and widths that take the
/// unrolled loop, its remainder, or only the remainder; fresh random operands each time.
fn gemv_matches_a_reference(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for m in 1..=MAX_ROWS {
            for (n, k) in [(1, 8), (37, 64), (130, 1032), (300, 2048), (5, 4096 + 8)] {
                let x = uniform(&mut rng, &[m, k], dtype, dev)?;
                let w = uniform(&mut rng, &[n, k], dtype, dev)?;
                let y = gemv(&x, &w)?;
                assert_eq!(y.dims(), [m, n]);
                let err = relative_error(&y, &reference(&x, &w)?)?;
                assert!(err <= tolerance(dtype), "{dtype:?} ({m}, {k}) x ({n}, {k}): relative error {err}");
            }
        }
    }
    Ok(())
}
test_device!(gemv_matches_a_reference);

/// A row gets the same bits alone as with up to seven others, and the same bits run after run.
fn rows_are_the_same_at_every_row_count(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(12);
    for dtype in [DType::F32, DType::BF16] {
        let (n, k) = (260, 2048 + 64);
        let x = uniform(&mut rng, &[MAX_ROWS, k], dtype, dev)?;
        let w = uniform(&mut rng, &[n, k], dtype, dev)?;
        let all = gemv(&x, &w)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for m in 1..=MAX_ROWS {
            let some = gemv(&x.narrow(0, 0, m)?, &w)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (i, row) in some.iter().enumerate() {
                let same = row.iter().zip(&all[i]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?}: row {i} of {m} differs from row {i} of {MAX_ROWS}");
            }
        }
        let again = gemv(&x, &w)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(again, all, "{dtype:?}: a second run differs");
    }
    Ok(())
}
test_device!(rows_are_the_same_at_every_row_count);

/// A view of `x` that starts off a 16-byte boundary is copied, not refused or misread.
fn an_unaligned_view_of_x_is_copied(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(13);
    let (n, k) = (40, 64);
    let flat = uniform(&mut rng, &[3 * k + 1], DType::BF16, dev)?;
    // Starts one element (2 bytes) into the buffer.
    let x = flat.narrow(0, 1, 3 * k)?.reshape((3, k))?;
    let w = uniform(&mut rng, &[n, k], DType::BF16, dev)?;
    let operand = super::checked(&x, &w)?;
    assert_eq!(operand.layout().start_offset(), 0, "the kernel's operand is a fresh, aligned buffer");
    let err = relative_error(&gemv(&x, &w)?, &reference(&x, &w)?)?;
    assert!(err <= tolerance(DType::BF16), "relative error {err}");
    Ok(())
}
test_device!(an_unaligned_view_of_x_is_copied);

/// Operands outside what the kernel takes are refused with an error, never run.
fn unsupported_operands_are_refused(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(14);
    let w = uniform(&mut rng, &[16, 64], DType::BF16, dev)?;
    let nine = uniform(&mut rng, &[MAX_ROWS + 1, 64], DType::BF16, dev)?;
    assert!(gemv(&nine, &w).is_err(), "more than MAX_ROWS rows");
    let narrow_k = uniform(&mut rng, &[2, 60], DType::BF16, dev)?;
    let w60 = uniform(&mut rng, &[16, 60], DType::BF16, dev)?;
    assert!(gemv(&narrow_k, &w60).is_err(), "rows of 120 bytes");
    let f32_x = uniform(&mut rng, &[2, 64], DType::F32, dev)?;
    assert!(gemv(&f32_x, &w).is_err(), "mixed dtypes");
    let other_k = uniform(&mut rng, &[2, 72], DType::BF16, dev)?;
    assert!(gemv(&other_k, &w).is_err(), "k differs");
    let w_t = uniform(&mut rng, &[64, 16], DType::BF16, dev)?.t()?;
    assert!(gemv(&uniform(&mut rng, &[2, 64], DType::BF16, dev)?, &w_t).is_err(), "a transposed weight");
    let empty = Tensor::zeros((0, 64), DType::BF16, dev)?;
    assert!(gemv(&empty, &w).is_err(), "no rows");
    assert!(supports(1, 8, DType::BF16) && supports(8, 4, DType::F32) && !supports(1, 4, DType::BF16));
    Ok(())
}
test_device!(unsupported_operands_are_refused);

/// `gemv_norm` against an f64 reference of the add, the norm and the product, with and without a
/// residual, for every row count it takes; the new residual stream is `x + r` rounded, exactly.
fn gemv_norm_matches_a_reference(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(15);
    let eps = 1e-5;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for m in 1..=MAX_NORM_ROWS {
            for (n, k) in [(1, 8), (37, 64), (300, 2048), (5, 4096 + 8)] {
                let x = uniform(&mut rng, &[m, k], dtype, dev)?;
                let r = uniform(&mut rng, &[m, k], dtype, dev)?;
                let w = uniform(&mut rng, &[n, k], dtype, dev)?;
                for residual in [None, Some(&r)] {
                    let (sum, y) = gemv_norm(&x, residual, &w, eps)?;
                    let s = match residual {
                        Some(r) => (&x + r)?,
                        None => x.clone(),
                    };
                    match (&sum, residual) {
                        (Some(sum), Some(_)) => {
                            assert_eq!(sum.dims(), [m, k]);
                            let diff = (sum.to_dtype(DType::F32)? - s.to_dtype(DType::F32)?)?.abs()?.max_all()?;
                            assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{dtype:?}: the sum is x + r rounded");
                        }
                        (None, None) => {}
                        _ => panic!("a sum exactly when there is a residual"),
                    }
                    // (s / rms(s)) · wᵀ in f64.
                    let s64 = s.to_dtype(DType::F64)?;
                    let rms = (s64.sqr()?.mean_keepdim(1)? + eps as f64)?.sqrt()?;
                    let normed = s64.broadcast_div(&rms)?;
                    let want = reference(&normed, &w)?;
                    let err = relative_error(&y, &want)?;
                    let what = format!("{dtype:?} ({m}, {k}) x ({n}, {k}), residual {}", residual.is_some());
                    assert!(err <= tolerance(dtype), "{what}: relative error {err}");
                }
            }
        }
    }
    Ok(())
}
test_device!(gemv_norm_matches_a_reference);

/// With the norm's weight folded into the projection's, `gemv_norm` computes what the separate
/// ops do (add, `rms_norm` times the norm's weight, rounded, then the product), to rounding; a
/// row's bits are the same alone as with the other row.
fn gemv_norm_with_a_folded_weight_is_the_norm_then_the_product(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(16);
    let eps = 1e-5;
    for dtype in [DType::F32, DType::BF16] {
        let (n, k) = (200, 1024);
        let x = uniform(&mut rng, &[2, k], dtype, dev)?;
        let r = uniform(&mut rng, &[2, k], dtype, dev)?;
        let w = uniform(&mut rng, &[n, k], dtype, dev)?;
        // A norm weight around 1, as trained models have.
        let norm = uniform(&mut rng, &[k], DType::F32, dev)?.affine(0.5, 1.0)?.to_dtype(dtype)?;
        let s = (&x + &r)?.to_dtype(DType::F32)?;
        let rms = (s.sqr()?.mean_keepdim(1)? + eps as f64)?.sqrt()?;
        let normed = s.broadcast_div(&rms)?.broadcast_mul(&norm.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let want = reference(&normed, &w)?;
        let (_, y) = gemv_norm(&x, Some(&r), &fold_norm_weight(&w, &norm)?, eps)?;
        let err = relative_error(&y, &want)?;
        assert!(err <= 2.0 * tolerance(dtype), "{dtype:?}: relative error {err}");
        let folded = fold_norm_weight(&w, &norm)?;
        let both = gemv_norm(&x, Some(&r), &folded, eps)?.1.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (i, row) in both.iter().enumerate() {
            let one = gemv_norm(&x.narrow(0, i, 1)?, Some(&r.narrow(0, i, 1)?), &folded, eps)?.1;
            assert_eq!(&one.to_dtype(DType::F32)?.to_vec2::<f32>()?[0], row, "{dtype:?}: row {i}");
        }
    }
    Ok(())
}
test_device!(gemv_norm_with_a_folded_weight_is_the_norm_then_the_product);

fn gemv_norm_refuses_what_it_does_not_take(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let w = uniform(&mut rng, &[16, 64], DType::BF16, dev)?;
    let three = uniform(&mut rng, &[MAX_NORM_ROWS + 1, 64], DType::BF16, dev)?;
    assert!(gemv_norm(&three, None, &w, 1e-5).is_err(), "more than MAX_NORM_ROWS rows");
    let x = uniform(&mut rng, &[1, 64], DType::BF16, dev)?;
    let r = uniform(&mut rng, &[2, 64], DType::BF16, dev)?;
    assert!(gemv_norm(&x, Some(&r), &w, 1e-5).is_err(), "a residual of another shape");
    let none = Tensor::zeros((0, 64), DType::BF16, dev)?;
    assert!(gemv_norm(&x, None, &none, 1e-5).is_err(), "no output column");
    assert!(fold_norm_weight(&w, &uniform(&mut rng, &[63], DType::BF16, dev)?).is_err(), "a norm of another width");
    Ok(())
}
test_device!(gemv_norm_refuses_what_it_does_not_take);

/// The fold, slab by slab, is each weight times its column's norm weight, rounded once.
fn fold_norm_weight_scales_each_column_by_the_norm(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(18);
    let (n, k) = (2 * 4096 + 5, 16);
    let w = uniform(&mut rng, &[n, k], DType::BF16, dev)?;
    let norm = uniform(&mut rng, &[k], DType::BF16, dev)?;
    let folded = fold_norm_weight(&w, &norm)?;
    let want =
        w.to_dtype(DType::F32)?.broadcast_mul(&norm.to_dtype(DType::F32)?.reshape((1, k))?)?.to_dtype(DType::BF16)?;
    assert_eq!(folded.dims(), [n, k]);
    let diff = (folded.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    Ok(())
}
test_device!(fold_norm_weight_scales_each_column_by_the_norm);

/// The SwiGLU epilogue has the bits of the plain product followed by `fused::swiglu` (on CUDA: the
/// gemv kernel, then the swiglu kernel), for every row count and the three dtypes, in `gemv` and
/// in `gemv_norm` with and without a residual (whose new residual stream is the plain one's).
fn the_swiglu_epilogue_is_the_product_then_swiglu(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(19);
    let eps = 1e-5;
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (inter, k) in [(1, 8), (37, 64), (300, 2048), (5, 4096 + 8)] {
            let w = (uniform(&mut rng, &[2 * inter, k], DType::F32, dev)? * 2.0)?.to_dtype(dtype)?;
            for m in 1..=MAX_ROWS {
                let x = uniform(&mut rng, &[m, k], dtype, dev)?;
                let fused = gemv_with(&x, &w, Epilogue::Swiglu)?;
                assert_eq!(fused.dims(), [m, inter]);
                let apart = crate::fused::swiglu(&gemv(&x, &w)?)?;
                assert_eq!(bits(&fused)?, bits(&apart)?, "{dtype:?} gemv ({m}, {k}) x ({}, {k})", 2 * inter);
                if m > MAX_NORM_ROWS {
                    continue;
                }
                let r = uniform(&mut rng, &[m, k], dtype, dev)?;
                for residual in [None, Some(&r)] {
                    let (sum, y) = gemv_norm_with(&x, residual, &w, eps, Epilogue::Swiglu)?;
                    let (plain_sum, plain) = gemv_norm(&x, residual, &w, eps)?;
                    let what = format!("{dtype:?} gemv_norm ({m}, {k}), residual {}", residual.is_some());
                    assert_eq!(y.dims(), [m, inter], "{what}");
                    assert_eq!(bits(&y)?, bits(&crate::fused::swiglu(&plain)?)?, "{what}");
                    match (sum, plain_sum) {
                        (Some(a), Some(b)) => assert_eq!(bits(&a)?, bits(&b)?, "{what}: the sum"),
                        (None, None) => {}
                        _ => panic!("{what}: a sum exactly when there is a residual"),
                    }
                }
            }
        }
    }
    Ok(())
}
test_device!(the_swiglu_epilogue_is_the_product_then_swiglu);

/// The SwiGLU epilogue against an f64 reference of `silu(gate) · up` (the kernel rounds each
/// product to the dtype first, within the tolerance), so that the bit test above cannot pass on
/// two bodies wrong the same way.
fn the_swiglu_epilogue_matches_a_reference(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(20);
    for dtype in [DType::F32, DType::BF16] {
        let (inter, k, m) = (96, 1024, 3);
        let x = uniform(&mut rng, &[m, k], dtype, dev)?;
        let w = uniform(&mut rng, &[2 * inter, k], dtype, dev)?;
        let products = reference(&x, &w)?;
        let want: Vec<Vec<f64>> = products
            .iter()
            .map(|row| (0..inter).map(|j| row[j] / (1.0 + (-row[j]).exp()) * row[inter + j]).collect())
            .collect();
        let err = relative_error(&gemv_with(&x, &w, Epilogue::Swiglu)?, &want)?;
        assert!(err <= 2.0 * tolerance(dtype), "{dtype:?}: relative error {err}");
    }
    // A weight of an odd number of rows is no gate/up pair.
    let w = uniform(&mut rng, &[7, 64], DType::BF16, dev)?;
    let x = uniform(&mut rng, &[1, 64], DType::BF16, dev)?;
    assert!(gemv_with(&x, &w, Epilogue::Swiglu).is_err());
    assert!(gemv_norm_with(&x, None, &w, 1e-5, Epilogue::Swiglu).is_err());
    Ok(())
}
test_device!(the_swiglu_epilogue_matches_a_reference);

/// `gemv_norm_qkv_cache` has the bits of `gemv_norm` followed by `fused::qkv_rope_cache`: q, the
/// new residual stream and every element of both caches (slots shuffled, a padding row, random
/// positions), for both row counts, with and without a residual, the three dtypes and head shapes
/// with GQA groups of 1 to 4. On the CPU the op is those two ops composed, so the comparison means
/// something on a GPU only (`kernels-tests cuda`).
fn gemv_norm_qkv_cache_is_gemv_norm_then_qkv_rope_cache(dev: &Device) -> Result<()> {
    use rand::seq::SliceRandom;
    use rand::Rng;
    let mut rng = StdRng::seed_from_u64(21);
    let (num_blocks, block_size, max_positions, eps) = (6, 4, 100, 1e-5);
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (h, kv, d, k) in [(4, 1, 16, 64), (9, 3, 64, 256), (2, 2, 8, 8 + 16), (8, 2, 128, 512)] {
            let w = uniform(&mut rng, &[(h + 2 * kv) * d, k], dtype, dev)?;
            let cos = uniform(&mut rng, &[max_positions, d / 2], dtype, dev)?;
            let sin = uniform(&mut rng, &[max_positions, d / 2], dtype, dev)?;
            for m in 1..=MAX_NORM_ROWS {
                let x = uniform(&mut rng, &[m, k], dtype, dev)?;
                let r = uniform(&mut rng, &[m, k], dtype, dev)?;
                let positions: Vec<u32> = (0..m).map(|_| rng.random_range(0..max_positions as u32)).collect();
                let mut slots: Vec<u32> = (0..(num_blocks * block_size) as u32).collect();
                slots.shuffle(&mut rng);
                slots.truncate(m);
                let positions = Tensor::new(positions, dev)?;
                for residual in [None, Some(&r)] {
                    // Without a residual every row is stored; with one, a second row is padding.
                    let mut slots = slots.clone();
                    if m == 2 && residual.is_some() {
                        slots[1] = crate::PAD_SLOT;
                    }
                    let slot_mapping = Tensor::new(slots, dev)?;
                    let k_cache = uniform(&mut rng, &[num_blocks, block_size, kv, d], dtype, dev)?;
                    let v_cache = uniform(&mut rng, &[num_blocks, block_size, kv, d], dtype, dev)?;
                    let (k_want, v_want) = (k_cache.copy()?, v_cache.copy()?);
                    let cache = QkvCache {
                        cos: &cos,
                        sin: &sin,
                        positions: &positions,
                        key_cache: &k_cache,
                        value_cache: &v_cache,
                        slot_mapping: &slot_mapping,
                        heads: h,
                        kv_heads: kv,
                        head_dim: d,
                    };
                    let (sum, q) = gemv_norm_qkv_cache(&x, residual, &w, eps, &cache)?;
                    let (sum_want, qkv) = gemv_norm(&x, residual, &w, eps)?;
                    let q_want = crate::fused::qkv_rope_cache(
                        &qkv,
                        &cos,
                        &sin,
                        &positions,
                        &k_want,
                        &v_want,
                        &slot_mapping,
                        (h, kv, d),
                    )?;
                    let what = format!("{dtype:?} m {m}, ({h}, {kv}, {d}), k {k}, residual {}", residual.is_some());
                    assert_eq!(q.dims(), [m, h, d], "{what}");
                    assert_eq!(bits(&q)?, bits(&q_want)?, "{what}: q");
                    assert_eq!(bits(&k_cache)?, bits(&k_want)?, "{what}: key cache");
                    assert_eq!(bits(&v_cache)?, bits(&v_want)?, "{what}: value cache");
                    match (sum, sum_want) {
                        (Some(a), Some(b)) => assert_eq!(bits(&a)?, bits(&b)?, "{what}: the sum"),
                        (None, None) => {}
                        _ => panic!("{what}: a sum exactly when there is a residual"),
                    }
                }
            }
        }
    }
    Ok(())
}
test_device!(gemv_norm_qkv_cache_is_gemv_norm_then_qkv_rope_cache);

/// Operands that do not fit are refused, nothing run.
fn gemv_norm_qkv_cache_refuses_what_does_not_fit(dev: &Device) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(22);
    let (h, kv, d, k) = (4, 2, 8, 64);
    let w = uniform(&mut rng, &[(h + 2 * kv) * d, k], DType::F32, dev)?;
    let cos = uniform(&mut rng, &[16, d / 2], DType::F32, dev)?;
    let sin = uniform(&mut rng, &[16, d / 2], DType::F32, dev)?;
    let k_cache = Tensor::zeros((4, 4, kv, d), DType::F32, dev)?;
    let v_cache = Tensor::zeros((4, 4, kv, d), DType::F32, dev)?;
    let positions = Tensor::new(&[1u32, 15], dev)?;
    let slots = Tensor::new(&[3u32, 9], dev)?;
    let cache = QkvCache {
        cos: &cos,
        sin: &sin,
        positions: &positions,
        key_cache: &k_cache,
        value_cache: &v_cache,
        slot_mapping: &slots,
        heads: h,
        kv_heads: kv,
        head_dim: d,
    };
    let x = uniform(&mut rng, &[2, k], DType::F32, dev)?;
    assert!(gemv_norm_qkv_cache(&x, None, &w, 1e-5, &cache).is_ok());
    let three = uniform(&mut rng, &[3, k], DType::F32, dev)?;
    assert!(gemv_norm_qkv_cache(&three, None, &w, 1e-5, &cache).is_err(), "more than MAX_NORM_ROWS rows");
    let one = uniform(&mut rng, &[1, k], DType::F32, dev)?;
    assert!(gemv_norm_qkv_cache(&one, None, &w, 1e-5, &cache).is_err(), "two positions for one row");
    let wide = QkvCache { head_dim: 2 * d, ..cache };
    assert!(gemv_norm_qkv_cache(&x, None, &w, 1e-5, &wide).is_err(), "w has too few rows for the heads");
    let r = uniform(&mut rng, &[1, k], DType::F32, dev)?;
    assert!(gemv_norm_qkv_cache(&x, Some(&r), &w, 1e-5, &cache).is_err(), "a residual of another shape");
    let bf16_caches = (k_cache.to_dtype(DType::BF16)?, v_cache.to_dtype(DType::BF16)?);
    let other = QkvCache { key_cache: &bf16_caches.0, value_cache: &bf16_caches.1, ..cache };
    assert!(gemv_norm_qkv_cache(&x, None, &w, 1e-5, &other).is_err(), "caches of another dtype");
    Ok(())
}
test_device!(gemv_norm_qkv_cache_refuses_what_does_not_fit);
