//! The portable path: the module docs' definition written out, one FMA chain per output.
//!
//! `f32::mul_add` is a correctly rounded fused multiply-add on every target, so this path gives
//! the same bits as the SIMD ones. Without hardware FMA (e.g. x86-64 before Haswell) it is slow;
//! it exists for other architectures and as the tests' yardstick.

use super::{PanelJob, PanelRef, PANEL};

/// Rows per register tile; any value gives the same bits.
const ROWS: usize = 4;

/// `out[r][j] = Σ_i x[r][i] · w[i][j]` for all `m = out.len() / PANEL` rows of `job.x`.
pub(super) fn panel(job: &PanelJob<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    debug_assert!(job.fits(out.len()));
    let (x, k) = (job.x, job.k);
    let w = match job.w {
        PanelRef::F32(w) => w,
        w => {
            scratch.resize(k * PANEL, 0.0);
            w.widen_into(scratch);
            scratch
        }
    };
    for (x, out) in x.chunks(ROWS * k).zip(out.chunks_mut(ROWS * PANEL)) {
        let mut acc = [[0.0f32; PANEL]; ROWS];
        for (i, w) in w.chunks_exact(PANEL).enumerate() {
            for (acc, x) in acc.iter_mut().zip(x.chunks_exact(k)) {
                let xi = x[i];
                acc.iter_mut().zip(w).for_each(|(a, &w)| *a = xi.mul_add(w, *a));
            }
        }
        for (acc, out) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
            out.copy_from_slice(acc);
        }
    }
}
