//! The output `y` (`[m, n]`), written concurrently by tasks that each own whole panels of columns.
//!
//! Writing each panel's `[m][PANEL]` result straight into its columns of `y` saves a second
//! `[m, n]` buffer and a pass over it, which on the LM head (`n` = 49152) at prefill is hundreds
//! of megabytes of memory traffic per call. The int8-activation kernels store their registers
//! there directly ([`PanelOut`]); the f32-activation ones fill a `[m][PANEL]` buffer that is then
//! copied in (that copy was ~9% of a concurrency-32 step on the int8 path, ~4% once gone).

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

/// `y` (`[m, n]` row-major) built panel by panel over rayon: `panel(state, p, out)` writes every
/// row of panel `p` (output columns `p * PANEL..`) through `out`, straight into `y` for a whole
/// panel, into a buffer copied into `y` for the last one when `n` is not a multiple of `PANEL`;
/// `state` is a per-task scratch made by `init`. Tasks carry at least `MIN_TASK_MACS`
/// multiply-adds for a `k`-deep weight.
pub(super) fn by_panels<S>(
    m: usize,
    n: usize,
    k: usize,
    init: impl Fn() -> S + Sync + Send,
    panel: impl Fn(&mut S, usize, PanelOut<'_>) + Sync + Send,
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
        |(buf, state), p| {
            if (p + 1) * PANEL <= n {
                // SAFETY: the range yields each panel once, so only this task writes panel `p`,
                // and it is whole.
                panel(state, p, unsafe { columns.panel_out(p) });
            } else {
                // (m, PANEL)
                buf.resize(m * PANEL, 0.0);
                panel(state, p, PanelOut::contiguous(buf));
                // SAFETY: as above.
                unsafe { columns.write_panel(p, buf) }
            }
        },
    );
    // SAFETY: every panel `0..n.div_ceil(PANEL)` has been written, each for all `m` rows and all
    // its columns below `n`, which together are all `m * n` elements (a panic above would have
    // left before this line, with `y` still empty).
    unsafe { y.set_len(len) };
    y
}

/// Where one panel's results go: `rows` rows of `PANEL` floats, `stride` floats apart, possibly
/// uninitialised (so it hands out pointers and takes whole rows, never a reference to them).
pub(super) struct PanelOut<'a> {
    ptr: *mut f32,
    stride: usize,
    rows: usize,
    _y: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

impl<'a> PanelOut<'a> {
    /// A `[rows][PANEL]` buffer.
    pub(super) fn contiguous(buf: &'a mut [f32]) -> Self {
        assert!(buf.len().is_multiple_of(PANEL), "a panel buffer is whole rows");
        Self { ptr: buf.as_mut_ptr(), stride: PANEL, rows: buf.len() / PANEL, _y: PhantomData }
    }

    /// Rows to write.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Floats from one row's start to the next's.
    pub(super) fn stride(&self) -> usize {
        self.stride
    }

    /// Row 0: row `r`'s `PANEL` floats start `r * stride()` further on, for `r < rows()`, and may
    /// be written through it while `self` is borrowed.
    pub(super) fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr
    }

    /// Writes row `r`.
    pub(super) fn write_row(&mut self, r: usize, row: &[f32; PANEL]) {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        // SAFETY: row `r < rows` has `PANEL` writable floats at `r * stride` (the type's invariant),
        // which `row`, a shared borrow, cannot overlap while `self` is borrowed mutably.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.ptr.add(r * self.stride), PANEL) };
    }

    /// Writes `[rows][PANEL]` from `src`.
    pub(super) fn write(&mut self, src: &[f32]) {
        assert_eq!(src.len(), self.rows * PANEL, "a whole panel");
        for (r, row) in src.chunks_exact(PANEL).enumerate() {
            self.write_row(r, row.try_into().expect("PANEL floats"));
        }
    }
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

    /// Panel `p`'s columns of `y` as a [`PanelOut`].
    ///
    /// # Safety
    ///
    /// Panel `p` is whole (`(p + 1) * PANEL <= n`) and no other thread writes it while the result
    /// lives.
    pub(super) unsafe fn panel_out(&self, p: usize) -> PanelOut<'_> {
        assert!((p + 1) * PANEL <= self.n, "panel {p} is not whole");
        // SAFETY: `p * PANEL < n`, inside row 0 of `y`.
        let ptr = unsafe { self.ptr.add(p * PANEL) };
        PanelOut { ptr, stride: self.n, rows: self.m, _y: PhantomData }
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
