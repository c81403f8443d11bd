//! Start-up checks of Sluice's CUDA kernels that have a fallback: `sluice_kernels::gemv`,
//! `gemv_norm` (with their epilogues) and `gemv_norm_qkv_cache` (else cuBLAS for small batches), and
//! `fused::qkv_rope_cache` (else `qkv_rope` and `reshape_and_cache`). Each runs once on the model's
//! device against references on the host; the engine uses a kernel only where it agrees.

use candle_core::{DType, Device, Tensor};
use sluice_kernels::gemv::{self, Epilogue};

use crate::error::Result;

/// Whether `sluice_kernels::gemv` computes what it should on `device` for `dtype`: every row count
/// it takes, with each epilogue, against an f64 reference on the host, and `gemv_norm_qkv_cache`
/// against its ops composed on the host, within the dtype's rounding. The engine runs it
/// once at load and keeps cuBLAS for every batch if it fails (saying so in its log).
pub fn check_gemv(device: &Device, dtype: DType) -> bool {
    let product = |x: &Tensor, w: &Tensor, e: Epilogue| Ok(gemv::gemv_with(x, w, e)?);
    let normed =
        |x: &Tensor, r: Option<&Tensor>, w: &Tensor, e: Epilogue| Ok(gemv::gemv_norm_with(x, r, w, NORM_CHECK_EPS, e)?);
    let qkv = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, cache: &gemv::QkvCache<'_>| {
        Ok(gemv::gemv_norm_qkv_cache(x, r, w, NORM_CHECK_EPS, cache)?)
    };
    let found = gemv_disagreement(device, dtype, product, normed).and_then(|found| match found {
        None => qkv_disagreement(device, dtype, qkv),
        some => Ok(some),
    });
    passes(found, "gemv", "small batches use cuBLAS")
}

/// Whether a check `found` nothing wrong with `kernel`; otherwise logs what (or the error) and
/// what runs instead (`fallback`). Every start-up check of a kernel decides here.
pub(super) fn passes(found: Result<Option<String>>, kernel: &str, fallback: &str) -> bool {
    match found {
        Ok(None) => true,
        Ok(Some(what)) => {
            tracing::warn!(%what, "{kernel} disagrees with its reference on this device: {fallback}");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "{kernel} failed on this device: {fallback}");
            false
        }
    }
}

/// The relative error allowed for `dtype`: each output rounded once to it, sums in f32.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 8e-3,
    }
}

/// The norm's epsilon in [`check_gemv`]'s `gemv_norm` cases.
const NORM_CHECK_EPS: f32 = 1e-5;

/// What [`check_gemv`] finds wrong, if anything, with `product` standing for `gemv_with` (every
/// row count) and `normed` for `gemv_norm_with` (`(x, r, w)` → `(x + r, y)` with a residual,
/// `(None, y)` without; its row counts), each with both epilogues, against f64 references on the
/// host.
fn gemv_disagreement(
    device: &Device,
    dtype: DType,
    product: impl Fn(&Tensor, &Tensor, Epilogue) -> Result<Tensor>,
    normed: impl Fn(&Tensor, Option<&Tensor>, &Tensor, Epilogue) -> Result<(Option<Tensor>, Tensor)>,
) -> Result<Option<String>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37);
    let tolerance = tolerance(dtype);
    let mut random = |rows: usize, cols: usize| -> Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?)
    };
    let host = |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?) };
    // Each row of `x` scaled by `scale` against each row of `w`, then the epilogue.
    let expected = |x: &[Vec<f64>], scale: &[f64], w: &[Vec<f64>], epilogue: Epilogue| -> Vec<Vec<f64>> {
        x.iter()
            .zip(scale)
            .map(|(row, s)| {
                let products: Vec<f64> =
                    w.iter().map(|col| s * row.iter().zip(col).map(|(a, b)| a * b).sum::<f64>()).collect();
                match epilogue {
                    Epilogue::Store => products,
                    Epilogue::Swiglu => {
                        let (gate, up) = products.split_at(products.len() / 2);
                        gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
                    }
                }
            })
            .collect()
    };
    // ‖got − want‖ / ‖want‖; infinite on a wrong shape.
    let error = |want: &[Vec<f64>], got: &[Vec<f64>]| -> f64 {
        if got.len() != want.len() || got.iter().zip(want).any(|(g, w)| g.len() != w.len()) {
            return f64::INFINITY;
        }
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            diff += (g - w) * (g - w);
            norm += w * w;
        }
        (diff / norm).sqrt()
    };
    // Even row counts, so that each weight is also a gate/up pair.
    for (n, k) in [(258, 1024), (38, 4096 + 8)] {
        let w = random(n, k)?;
        let w_host = host(&w)?;
        let w = w.to_device(device)?;
        for (m, epilogue) in (1..=gemv::MAX_ROWS).flat_map(|m| [(m, Epilogue::Store), (m, Epilogue::Swiglu)]) {
            let x = random(m, k)?;
            let got = host(&product(&x.to_device(device)?, &w, epilogue)?)?;
            let err = error(&expected(&host(&x)?, &vec![1.0; m], &w_host, epilogue), &got);
            if err.is_nan() || err > tolerance {
                return Ok(Some(format!("gemv ({m}, {k}) x ({n}, {k}), {epilogue:?}: relative error {err}")));
            }
        }
        let cases = (1..=gemv::MAX_NORM_ROWS)
            .flat_map(|m| [(m, false), (m, true)])
            .flat_map(|(m, residual)| [(m, residual, Epilogue::Store), (m, residual, Epilogue::Swiglu)]);
        for (m, residual, epilogue) in cases {
            let (x, r) = (random(m, k)?, random(m, k)?);
            let r_dev = if residual { Some(r.to_device(device)?) } else { None };
            let (sum, got) = normed(&x.to_device(device)?, r_dev.as_ref(), &w, epilogue)?;
            // The row normed: x + r rounded to the dtype (as the kernel's sum must be), or x.
            let s = if residual { (&x + &r)? } else { x };
            let s_host = host(&s)?;
            match (sum, residual) {
                (Some(sum), true) if host(&sum)? == s_host => {}
                (None, false) => {}
                _ => return Ok(Some(format!("gemv_norm ({m}, {k}), {epilogue:?}: the residual sum is not x + r"))),
            }
            let scale: Vec<f64> = s_host
                .iter()
                .map(|row| 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / k as f64 + NORM_CHECK_EPS as f64).sqrt())
                .collect();
            let err = error(&expected(&s_host, &scale, &w_host, epilogue), &host(&got)?);
            if err.is_nan() || err > tolerance {
                let with = if residual { "with" } else { "without" };
                return Ok(Some(format!(
                    "gemv_norm ({m}, {k}) x ({n}, {k}), {epilogue:?}, {with} a residual: relative error {err}"
                )));
            }
        }
    }
    Ok(None)
}

/// The largest ‖got − want‖ / ‖want‖ over runs of `row` consecutive elements (a head or a few
/// heads of q, one kv head or all of a cache slot: a wrong run is not diluted by the right ones);
/// infinite on a wrong shape or a NaN.
fn worst_row_error(got: &Tensor, want: &Tensor, row: usize) -> Result<f64> {
    if got.dims() != want.dims() {
        return Ok(f64::INFINITY);
    }
    let flat = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?) };
    let (got, want) = (flat(got)?, flat(want)?);
    let mut worst = 0.0f64;
    for (g, w) in got.chunks(row).zip(want.chunks(row)) {
        let diff: f64 = g.iter().zip(w).map(|(g, w)| (g - w) * (g - w)).sum();
        let norm: f64 = w.iter().map(|w| w * w).sum();
        let err = if diff == 0.0 { 0.0 } else { (diff / norm).sqrt() };
        worst = if err.is_nan() { f64::INFINITY } else { worst.max(err) };
    }
    Ok(worst)
}

/// Whether `fused::qkv_rope_cache` on `device` does what `qkv_rope` and `reshape_and_cache` do on
/// the host, within `dtype`'s rounding, for the model's head layout `(heads, kv_heads, head_dim)`
/// (three rows, one of them padding; q and both caches compared head by head). The model runs it
/// once at load on CUDA and keeps the separate ops if it fails (saying so in its log).
pub fn check_qkv_rope_cache(device: &Device, dtype: DType, heads: (usize, usize, usize)) -> bool {
    let fused = |qkv: &Tensor, cos: &Tensor, sin: &Tensor, pos: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor| {
        Ok(sluice_kernels::fused::qkv_rope_cache(qkv, cos, sin, pos, k, v, slots, heads)?)
    };
    passes(rope_cache_disagreement(device, dtype, heads, fused), "qkv_rope_cache", "the separate ops run")
}

/// What [`check_qkv_rope_cache`] finds wrong, if anything, with `fused` standing for the op
/// (operands: qkv, cos, sin, positions, the key and value caches, the slots).
fn rope_cache_disagreement(
    device: &Device,
    dtype: DType,
    (h, kv, d): (usize, usize, usize),
    fused: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Option<String>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x40be);
    let (num_blocks, block_size, max_positions) = (4, 4, 64);
    let mut random = |dims: &[usize]| -> Result<Tensor> {
        let data: Vec<f32> = (0..dims.iter().product()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?.to_dtype(dtype)?)
    };
    let qkv = random(&[3, (h + 2 * kv) * d])?;
    let (cos, sin) = (random(&[max_positions, d / 2])?, random(&[max_positions, d / 2])?);
    let (k_cache, v_cache) = (random(&[num_blocks, block_size, kv, d])?, random(&[num_blocks, block_size, kv, d])?);
    let positions = Tensor::new(&[5u32, 62, 0], &Device::Cpu)?;
    let slots = Tensor::new(&[3u32, sluice_kernels::PAD_SLOT, 9], &Device::Cpu)?;
    let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.copy()?) };
    let (k_dev, v_dev) = (on(&k_cache)?, on(&v_cache)?);
    let q = fused(&on(&qkv)?, &on(&cos)?, &on(&sin)?, &on(&positions)?, &k_dev, &v_dev, &on(&slots)?)?;
    // The separate ops on the host.
    let (cos_rows, sin_rows) = (cos.index_select(&positions, 0)?, sin.index_select(&positions, 0)?);
    let (q_want, k, v) = sluice_kernels::fused::qkv_rope(&qkv, &cos_rows, &sin_rows, h, kv, d)?;
    sluice_kernels::reshape_and_cache(&k, &v, &k_cache, &v_cache, &slots)?;
    let tolerance = tolerance(dtype);
    for (part, got, want) in [("q", &q, &q_want), ("key cache", &k_dev, &k_cache), ("value cache", &v_dev, &v_cache)] {
        let err = worst_row_error(got, want, d)?;
        if err > tolerance {
            return Ok(Some(format!("qkv_rope_cache ({h}, {kv}, {d}): {part}: relative error {err}")));
        }
    }
    Ok(None)
}

/// The result of `gemv_norm_qkv_cache` standing in for it: `(x, r, w, cache)` → `(x + r, q)`.
type QkvResult = Result<(Option<Tensor>, Tensor)>;

/// What [`check_gemv`] finds wrong, if anything, with `fused` standing for
/// `gemv_norm_qkv_cache` on `device`: its q, new residual stream and both caches against the
/// host's `gemv_norm` then `qkv_rope_cache` on the same operands (four query heads a kv head of
/// 64, as in Llama-3.2-1B; one and two rows, both stored without a residual and a padding row
/// with one).
fn qkv_disagreement(
    device: &Device,
    dtype: DType,
    fused: impl Fn(&Tensor, Option<&Tensor>, &Tensor, &gemv::QkvCache<'_>) -> QkvResult,
) -> Result<Option<String>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x51ce);
    let tolerance = tolerance(dtype);
    let (h, kv, d, k, max_positions) = (4, 2, 64, 1024, 64);
    let (num_blocks, block_size) = (4, 4);
    let mut random = |dims: &[usize]| -> Result<Tensor> {
        let data: Vec<f32> = (0..dims.iter().product()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?.to_dtype(dtype)?)
    };
    let error = worst_row_error;
    let w = random(&[(h + 2 * kv) * d, k])?;
    let (cos, sin) = (random(&[max_positions, d / 2])?, random(&[max_positions, d / 2])?);
    let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
    let (w_dev, cos_dev, sin_dev) = (on(&w)?, on(&cos)?, on(&sin)?);
    for (m, residual) in [(1, false), (1, true), (2, false), (2, true)] {
        let (x, r) = (random(&[m, k])?, random(&[m, k])?);
        let positions = Tensor::new(&[37u32, 5][..m], &Device::Cpu)?;
        let second = if residual { sluice_kernels::PAD_SLOT } else { 11 };
        let slots = Tensor::new(&[6u32, second][..m], &Device::Cpu)?;
        let (k_cache, v_cache) = (random(&[num_blocks, block_size, kv, d])?, random(&[num_blocks, block_size, kv, d])?);
        // Copies for the device (`to_device` on the CPU shares the storage).
        let (k_dev, v_dev) = (on(&k_cache)?.copy()?, on(&v_cache)?.copy()?);
        let (positions_dev, slots_dev) = (on(&positions)?, on(&slots)?);
        let cache = gemv::QkvCache {
            cos: &cos_dev,
            sin: &sin_dev,
            positions: &positions_dev,
            key_cache: &k_dev,
            value_cache: &v_dev,
            slot_mapping: &slots_dev,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        };
        let r_dev = if residual { Some(on(&r)?) } else { None };
        let (sum, q) = fused(&on(&x)?, r_dev.as_ref(), &w_dev, &cache)?;
        // The host's ops, on host copies.
        let r_host = residual.then_some(&r);
        let (sum_want, qkv) = gemv::gemv_norm(&x, r_host, &w, NORM_CHECK_EPS)?;
        let q_want = sluice_kernels::fused::qkv_rope_cache(
            &qkv,
            &cos,
            &sin,
            &positions,
            &k_cache,
            &v_cache,
            &slots,
            (h, kv, d),
        )?;
        let what = |part: &str| format!("gemv_norm_qkv_cache ({m}, {k}), residual {residual}: {part}");
        match (sum, sum_want) {
            (Some(a), Some(b)) if error(&a, &b, k)? == 0.0 => {}
            (None, None) => {}
            _ => return Ok(Some(what("the residual sum is not x + r"))),
        }
        for (part, got, want) in
            [("q", &q, &q_want), ("key cache", &k_dev, &k_cache), ("value cache", &v_dev, &v_cache)]
        {
            let err = error(got, want, kv * d)?;
            if err > tolerance {
                return Ok(Some(what(&format!("{part}: relative error {err}"))));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::EngineError;

    #[test]
    fn the_rope_cache_check_passes_where_the_kernel_is_right() {
        for (dtype, heads) in [(DType::F32, (9, 3, 64)), (DType::BF16, (32, 8, 64)), (DType::F16, (4, 4, 128))] {
            assert!(check_qkv_rope_cache(&Device::Cpu, dtype, heads), "{dtype:?} {heads:?}");
        }
        let right = |qkv: &Tensor, c: &Tensor, s: &Tensor, p: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor| {
            Ok(sluice_kernels::fused::qkv_rope_cache(qkv, c, s, p, k, v, slots, (4, 2, 8))?)
        };
        assert_eq!(rope_cache_disagreement(&Device::Cpu, DType::BF16, (4, 2, 8), right).unwrap(), None);
        // Keys not stored, a q rotated by the wrong position, or an op that fails, are refused.
        let keys_unstored =
            |qkv: &Tensor, c: &Tensor, s: &Tensor, p: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor| {
                let saved = k.copy()?;
                let q = sluice_kernels::fused::qkv_rope_cache(qkv, c, s, p, k, v, slots, (4, 2, 8))?;
                k.slice_set(&saved, 0, 0)?;
                Ok(q)
            };
        let found = rope_cache_disagreement(&Device::Cpu, DType::BF16, (4, 2, 8), keys_unstored).unwrap();
        assert!(found.as_deref().is_some_and(|w| w.contains("key cache")), "{found:?}");
        let wrong_position =
            |qkv: &Tensor, c: &Tensor, s: &Tensor, p: &Tensor, k: &Tensor, v: &Tensor, slots: &Tensor| {
                let p = (p.to_dtype(DType::F32)? + 1.0)?.to_dtype(DType::U32)?;
                Ok(sluice_kernels::fused::qkv_rope_cache(qkv, c, s, &p, k, v, slots, (4, 2, 8))?)
            };
        let found = rope_cache_disagreement(&Device::Cpu, DType::BF16, (4, 2, 8), wrong_position).unwrap();
        assert!(found.as_deref().is_some_and(|w| w.contains(": q:")), "{found:?}");
        let failing =
            |_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor| -> Result<Tensor> {
                Err(EngineError::Model("no kernel".into()))
            };
        assert!(rope_cache_disagreement(&Device::Cpu, DType::BF16, (4, 2, 8), failing).is_err());
    }

    #[test]
    fn the_gemv_check_passes_where_the_kernel_is_right() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert!(check_gemv(&Device::Cpu, dtype), "{dtype:?}");
        }
        // A kernel one row off, or a little off everywhere, or one that fails, is refused.
        let last_row_wrong = |x: &Tensor, w: &Tensor, e: Epilogue| -> Result<Tensor> {
            let y = gemv::gemv_with(x, w, e)?;
            let m = y.dim(0)?;
            if m < 3 {
                return Ok(y);
            }
            Ok(Tensor::cat(&[y.narrow(0, 0, m - 1)?, y.narrow(0, m - 1, 1)?.zeros_like()?], 0)?)
        };
        let scaled =
            |x: &Tensor, w: &Tensor, e: Epilogue| -> Result<Tensor> { Ok((gemv::gemv_with(x, w, e)? * 1.02)?) };
        let failing =
            |_: &Tensor, _: &Tensor, _: Epilogue| -> Result<Tensor> { Err(EngineError::Model("no kernel".into())) };
        let right = |x: &Tensor, w: &Tensor, e: Epilogue| -> Result<Tensor> { Ok(gemv::gemv_with(x, w, e)?) };
        // The SwiGLU epilogue with gate and up swapped: right for `Store` only.
        let swapped = |x: &Tensor, w: &Tensor, e: Epilogue| -> Result<Tensor> {
            let n = w.dim(0)? / 2;
            let w = match e {
                Epilogue::Store => w.clone(),
                Epilogue::Swiglu => Tensor::cat(&[w.narrow(0, n, n)?, w.narrow(0, 0, n)?], 0)?,
            };
            Ok(gemv::gemv_with(x, &w, e)?)
        };
        let normed = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, e: Epilogue| -> Result<(Option<Tensor>, Tensor)> {
            Ok(gemv::gemv_norm_with(x, r, w, NORM_CHECK_EPS, e)?)
        };
        // gemv_norm without the norm; with a sum that is not x + r; wrong only without a residual.
        let unnormed = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, e: Epilogue| -> Result<(Option<Tensor>, Tensor)> {
            let s = match r {
                Some(r) => (x + r)?,
                None => x.clone(),
            };
            Ok((r.map(|_| s.clone()), gemv::gemv_with(&s, w, e)?))
        };
        let wrong_sum = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, e: Epilogue| -> Result<(Option<Tensor>, Tensor)> {
            let (sum, y) = gemv::gemv_norm_with(x, r, w, NORM_CHECK_EPS, e)?;
            Ok((sum.map(|_| x.clone()), y))
        };
        let wrong_alone =
            |x: &Tensor, r: Option<&Tensor>, w: &Tensor, e: Epilogue| -> Result<(Option<Tensor>, Tensor)> {
                let (sum, y) = gemv::gemv_norm_with(x, r, w, NORM_CHECK_EPS, e)?;
                Ok((sum, if r.is_none() { (y * 1.05)? } else { y }))
            };
        // The SwiGLU epilogue's activation left out (its product stored): right for `Store` only.
        let no_activation =
            |x: &Tensor, r: Option<&Tensor>, w: &Tensor, e: Epilogue| -> Result<(Option<Tensor>, Tensor)> {
                let (sum, y) = gemv::gemv_norm_with(x, r, w, NORM_CHECK_EPS, Epilogue::Store)?;
                Ok((sum, if e == Epilogue::Swiglu { y.narrow(1, 0, y.dim(1)? / 2)? } else { y }))
            };
        // gemv_norm_qkv_cache right; with q off by 2%; with the values not stored.
        let right_qkv = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, c: &gemv::QkvCache<'_>| -> QkvResult {
            Ok(gemv::gemv_norm_qkv_cache(x, r, w, NORM_CHECK_EPS, c)?)
        };
        let q_off = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, c: &gemv::QkvCache<'_>| -> QkvResult {
            let (sum, q) = gemv::gemv_norm_qkv_cache(x, r, w, NORM_CHECK_EPS, c)?;
            Ok((sum, (q * 1.02)?))
        };
        let values_unwritten = |x: &Tensor, r: Option<&Tensor>, w: &Tensor, c: &gemv::QkvCache<'_>| -> QkvResult {
            let saved = c.value_cache.copy()?;
            let out = gemv::gemv_norm_qkv_cache(x, r, w, NORM_CHECK_EPS, c)?;
            c.value_cache.slice_set(&saved, 0, 0)?;
            Ok(out)
        };
        for dtype in [DType::F32, DType::BF16] {
            let found = gemv_disagreement(&Device::Cpu, dtype, last_row_wrong, normed).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.starts_with("gemv (3, 1024)")), "{dtype:?}: {found:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, swapped, normed).unwrap();
            assert!(
                found.as_deref().is_some_and(|w| w.starts_with("gemv (1, 1024) x (258, 1024), Swiglu")),
                "{found:?}"
            );
            let found = gemv_disagreement(&Device::Cpu, dtype, right, no_activation).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains("Swiglu, without")), "{dtype:?}: {found:?}");
            assert!(gemv_disagreement(&Device::Cpu, dtype, scaled, normed).unwrap().is_some(), "{dtype:?}");
            assert!(gemv_disagreement(&Device::Cpu, dtype, failing, normed).is_err(), "{dtype:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, right, unnormed).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.starts_with("gemv_norm (1, 1024)")), "{dtype:?}: {found:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, right, wrong_sum).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains("not x + r")), "{dtype:?}: {found:?}");
            assert_eq!(qkv_disagreement(&Device::Cpu, dtype, right_qkv).unwrap(), None, "{dtype:?}");
            let found = qkv_disagreement(&Device::Cpu, dtype, q_off).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains(": q: relative error")), "{dtype:?}: {found:?}");
            let found = qkv_disagreement(&Device::Cpu, dtype, values_unwritten).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains("value cache")), "{dtype:?}: {found:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, right, wrong_alone).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains("without a residual")), "{dtype:?}: {found:?}");
        }
    }
}
