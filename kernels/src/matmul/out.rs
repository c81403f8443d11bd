//! The output `y` (`[m, n]`), written concurrently by tasks that each own whole panels of columns.
//!
//! Writing each panel's `[m][PANEL]` result straight into its columns of `y` saves a second
//! `[m, n]` buffer and a pass over it, which on the LM head (`n` = 49152) at prefill is hundreds
//! of megabytes of memory traffic per call.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use candle_core::{bail, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::{MIN_TASK_MACS, PANEL};
use crate::storage::contiguous_slice;

/// `y = x · Wᵀ` for a `[n, k]` weight: checks `x` (`[m, k]` f32 on the CPU, any `m`), borrows its
/// rows (copying a non-contiguous `x` first) and wraps what `matmul(rows, m)` returns as `[m, n]`.
///
/// Errors, without panicking, if `x` is not 2-D, not f32, not on the CPU, or has the wrong `k`.
pub(super) fn forward_rows(
    x: &Tensor,
    k: usize,
    n: usize,
    matmul: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<Tensor> {
    let (m, x_k) = x.dims2()?;
    if x_k != k {
        bail!("`x` has {x_k} features but the weight expects {k}")
    }
    if x.dtype() != DType::F32 {
        bail!("`x` must be f32, got {:?}", x.dtype())
    }
    if !x.device().is_cpu() {
        bail!("`x` must be on the CPU")
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("`x` must be on the CPU") };
    let xs = contiguous_slice::<f32>(cpu, layout, "x")?;
    let y = matmul(xs, m);
    Tensor::from_vec(y, (m, n), &Device::Cpu)
}

/// `y` (`[m, n]` row-major) built panel by panel over rayon: `panel(state, p, out)` fills `out`
/// (`[m][PANEL]`, output columns `p * PANEL..`) for panel `p`; `state` is a per-task scratch made
/// by `init`. Tasks carry at least `MIN_TASK_MACS` multiply-adds for a `k`-deep weight.
pub(super) fn by_panels<S>(
    m: usize,
    n: usize,
    k: usize,
    init: impl Fn() -> S + Sync + Send,
    panel: impl Fn(&mut S, usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let len = m * n;
    // Not zeroed: every element is written below (zeroing `y` first cost ~4% of a step).
    let mut y = Vec::with_capacity(len);
    if m == 0 {
        return y;
    }
    let columns = Columns::new(&mut y.spare_capacity_mut()[..len], m, n);
    let min_len = MIN_TASK_MACS.div_ceil(m * k * PANEL);
    (0..n.div_ceil(PANEL)).into_par_iter().with_min_len(min_len).for_each_init(
        || (Vec::new(), init()),
        |(out, state), p| {
            // (m, PANEL)
            out.resize(m * PANEL, 0.0);
            panel(state, p, out);
            // SAFETY: the range yields each panel once, so only this task writes panel `p`.
            unsafe { columns.write_panel(p, out) }
        },
    );
    // SAFETY: every panel `0..n.div_ceil(PANEL)` has been written, each for all `m` rows and all
    // its columns below `n`, which together are all `m * n` elements (a panic above would have
    // left before this line, with `y` still empty).
    unsafe { y.set_len(len) };
    y
}

/// `y`, `[m, n]` row-major, split by columns between tasks.
pub(super) struct Columns<'a> {
    ptr: *mut f32,
    m: usize,
    n: usize,
    _y: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: a `Columns` is a `&mut [f32]` (it borrows `y` exclusively for `'a`), and its only write,
// `write_panel`, requires that no two threads write the same panel; distinct panels cover
// disjoint elements of `y`.
unsafe impl Send for Columns<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for Columns<'_> {}

impl<'a> Columns<'a> {
    /// Borrows `y`, which must be `m * n` long; it may be uninitialised (writing every panel
    /// initialises all of it).
    pub(super) fn new(y: &'a mut [MaybeUninit<f32>], m: usize, n: usize) -> Self {
        assert_eq!(y.len(), m * n, "`y` must be [m, n]");
        Self { ptr: y.as_mut_ptr().cast::<f32>(), m, n, _y: PhantomData }
    }

    /// Copies `panel` (`[m][PANEL]`, output columns `p * PANEL..` plus zero padding) into `y`,
    /// dropping the columns past `n`.
    ///
    /// # Safety
    ///
    /// No other thread writes panel `p` during this call.
    pub(super) unsafe fn write_panel(&self, p: usize, panel: &[f32]) {
        let start = p * PANEL;
        assert!(start < self.n && panel.len() == self.m * PANEL, "panel {p} out of range");
        let width = PANEL.min(self.n - start);
        for (r, src) in panel.chunks_exact(PANEL).enumerate() {
            // SAFETY: `r < m` and `start + width <= n`, so the `width` elements from
            // `r * n + start` lie inside `y`; they belong to panel `p`, which the caller
            // guarantees no one else writes now, and `src` is a separate allocation.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(r * self.n + start), width) };
        }
    }
}
