//! The output `y` (`[m, n]`), written concurrently by tasks that each own whole panels of columns.
//!
//! Writing each panel's `[m][PANEL]` result straight into its columns of `y` saves a second
//! `[m, n]` buffer and a pass over it, which on the LM head (`n` = 49152) at prefill is hundreds
//! of megabytes of memory traffic per call.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use super::PANEL;

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
