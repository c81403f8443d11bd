//! The start-up check of `sluice_kernels::gemv` and `gemv_norm` on the model's device: the engine
//! sends small batches to them only when they agree with an f64 reference there.

use candle_core::{DType, Device, Tensor};
use sluice_kernels::gemv;

use crate::error::Result;

/// Whether `sluice_kernels::gemv` computes what it should on `device` for `dtype`: every row count
/// it takes, against an f64 reference on the host, within the dtype's rounding. The engine runs it
/// once at load and keeps cuBLAS for every batch if it fails (saying so in its log).
pub fn check_gemv(device: &Device, dtype: DType) -> bool {
    let product = |x: &Tensor, w: &Tensor| Ok(gemv::gemv(x, w)?);
    let normed = |x: &Tensor, r: Option<&Tensor>, w: &Tensor| Ok(gemv::gemv_norm(x, r, w, NORM_CHECK_EPS)?);
    match gemv_disagreement(device, dtype, product, normed) {
        Ok(None) => true,
        Ok(Some(what)) => {
            tracing::warn!(%what, "gemv disagrees with its reference on this device: small batches use cuBLAS");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "gemv failed on this device: small batches use cuBLAS");
            false
        }
    }
}

/// The norm's epsilon in [`check_gemv`]'s `gemv_norm` cases.
const NORM_CHECK_EPS: f32 = 1e-5;

/// What [`check_gemv`] finds wrong, if anything, with `product` standing for `gemv` (every row
/// count) and `normed` for `gemv_norm` (`(x, r, w)` → `(x + r, y)` with a residual, `(None, y)`
/// without; its row counts), against f64 references on the host.
fn gemv_disagreement(
    device: &Device,
    dtype: DType,
    product: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    normed: impl Fn(&Tensor, Option<&Tensor>, &Tensor) -> Result<(Option<Tensor>, Tensor)>,
) -> Result<Option<String>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e37);
    let tolerance = match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 8e-3,
    };
    let mut random = |rows: usize, cols: usize| -> Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?.to_dtype(dtype)?)
    };
    let host = |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?) };
    // ‖got − x·wᵀ‖ / ‖x·wᵀ‖, each row of `x` scaled by `scale` first; infinite on a wrong shape.
    let error = |x: &[Vec<f64>], scale: &[f64], w: &[Vec<f64>], got: &[Vec<f64>]| -> f64 {
        if got.len() != x.len() || got.iter().any(|r| r.len() != w.len()) {
            return f64::INFINITY;
        }
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for ((x_row, s), got_row) in x.iter().zip(scale).zip(got) {
            for (w_row, g) in w.iter().zip(got_row) {
                let want = s * x_row.iter().zip(w_row).map(|(a, b)| a * b).sum::<f64>();
                diff += (g - want) * (g - want);
                norm += want * want;
            }
        }
        (diff / norm).sqrt()
    };
    for (n, k) in [(257, 1024), (19, 4096 + 8)] {
        let w = random(n, k)?;
        let w_host = host(&w)?;
        let w = w.to_device(device)?;
        for m in 1..=gemv::MAX_ROWS {
            let x = random(m, k)?;
            let got = host(&product(&x.to_device(device)?, &w)?)?;
            let err = error(&host(&x)?, &vec![1.0; m], &w_host, &got);
            if err.is_nan() || err > tolerance {
                return Ok(Some(format!("gemv ({m}, {k}) x ({n}, {k}): relative error {err}")));
            }
        }
        for (m, residual) in (1..=gemv::MAX_NORM_ROWS).flat_map(|m| [(m, false), (m, true)]) {
            let (x, r) = (random(m, k)?, random(m, k)?);
            let r_dev = if residual { Some(r.to_device(device)?) } else { None };
            let (sum, got) = normed(&x.to_device(device)?, r_dev.as_ref(), &w)?;
            // The row normed: x + r rounded to the dtype (as the kernel's sum must be), or x.
            let s = if residual { (&x + &r)? } else { x };
            let s_host = host(&s)?;
            match (sum, residual) {
                (Some(sum), true) if host(&sum)? == s_host => {}
                (None, false) => {}
                _ => return Ok(Some(format!("gemv_norm ({m}, {k}): the residual sum is not x + r"))),
            }
            let scale: Vec<f64> = s_host
                .iter()
                .map(|row| 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / k as f64 + NORM_CHECK_EPS as f64).sqrt())
                .collect();
            let err = error(&s_host, &scale, &w_host, &host(&got)?);
            if err.is_nan() || err > tolerance {
                let with = if residual { "with" } else { "without" };
                return Ok(Some(format!("gemv_norm ({m}, {k}) x ({n}, {k}) {with} a residual: relative error {err}")));
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
    fn the_gemv_check_passes_where_the_kernel_is_right() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert!(check_gemv(&Device::Cpu, dtype), "{dtype:?}");
        }
        // A kernel one row off, or a little off everywhere, or one that fails, is refused.
        let last_row_wrong = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            let y = gemv::gemv(x, w)?;
            let m = y.dim(0)?;
            if m < 3 {
                return Ok(y);
            }
            Ok(Tensor::cat(&[y.narrow(0, 0, m - 1)?, y.narrow(0, m - 1, 1)?.zeros_like()?], 0)?)
        };
        let scaled = |x: &Tensor, w: &Tensor| -> Result<Tensor> { Ok((gemv::gemv(x, w)? * 1.02)?) };
        let failing = |_: &Tensor, _: &Tensor| -> Result<Tensor> { Err(EngineError::Model("no kernel".into())) };
        let right = |x: &Tensor, w: &Tensor| -> Result<Tensor> { Ok(gemv::gemv(x, w)?) };
        let normed = |x: &Tensor, r: Option<&Tensor>, w: &Tensor| -> Result<(Option<Tensor>, Tensor)> {
            Ok(gemv::gemv_norm(x, r, w, NORM_CHECK_EPS)?)
        };
        // gemv_norm without the norm; with a sum that is not x + r; wrong only without a residual.
        let unnormed = |x: &Tensor, r: Option<&Tensor>, w: &Tensor| -> Result<(Option<Tensor>, Tensor)> {
            let s = match r {
                Some(r) => (x + r)?,
                None => x.clone(),
            };
            Ok((r.map(|_| s.clone()), gemv::gemv(&s, w)?))
        };
        let wrong_sum = |x: &Tensor, r: Option<&Tensor>, w: &Tensor| -> Result<(Option<Tensor>, Tensor)> {
            let (sum, y) = gemv::gemv_norm(x, r, w, NORM_CHECK_EPS)?;
            Ok((sum.map(|_| x.clone()), y))
        };
        let wrong_alone = |x: &Tensor, r: Option<&Tensor>, w: &Tensor| -> Result<(Option<Tensor>, Tensor)> {
            let (sum, y) = gemv::gemv_norm(x, r, w, NORM_CHECK_EPS)?;
            Ok((sum, if r.is_none() { (y * 1.05)? } else { y }))
        };
        for dtype in [DType::F32, DType::BF16] {
            let found = gemv_disagreement(&Device::Cpu, dtype, last_row_wrong, normed).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.starts_with("gemv (3, 1024)")), "{dtype:?}: {found:?}");
            assert!(gemv_disagreement(&Device::Cpu, dtype, scaled, normed).unwrap().is_some(), "{dtype:?}");
            assert!(gemv_disagreement(&Device::Cpu, dtype, failing, normed).is_err(), "{dtype:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, right, unnormed).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.starts_with("gemv_norm (1, 1024)")), "{dtype:?}: {found:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, right, wrong_sum).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains("not x + r")), "{dtype:?}: {found:?}");
            let found = gemv_disagreement(&Device::Cpu, dtype, right, wrong_alone).unwrap();
            assert!(found.as_deref().is_some_and(|w| w.contains("without a residual")), "{dtype:?}: {found:?}");
        }
    }
}
