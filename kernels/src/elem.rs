//! The element types the ops accept, and their exact widening to f32.

use candle_core::WithDType;
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// A cache or activation element: f32, f16 or bf16. All arithmetic happens in f32.
pub(crate) trait Elem: WithDType {
    /// Widens `src` to f32, into `buf` when a conversion is needed.
    ///
    /// Widening is exact for all three types, so whether it is vectorised cannot change a result.
    /// `src` and `buf` have the same length.
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// Rounds `src` (f32) to nearest-even into `dst`. `src` and `dst` have the same length.
    fn narrow(src: &[f32], dst: &mut [Self]);

    /// One element widened to f32 (exact).
    fn widen1(self) -> f32;

    /// Sixteen consecutive elements from `ptr` widened to f32 (exact, the same values as
    /// [`Elem::widen1`]).
    ///
    /// # Safety
    ///
    /// AVX-512F is available and 16 elements from `ptr` are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn widen1(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(ptr)
    }

    #[inline]
    fn widen<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        // INVARIANT: callers pass equal lengths (both are `head_dim` long).
        dst.copy_from_slice(src);
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn widen1(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(ptr.cast()))
    }

    #[inline]
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        debug_assert_eq!(src.len(), buf.len());
        // INVARIANT: callers pass equal lengths (both are `head_dim` long).
        src.convert_to_f32_slice(buf);
        buf
    }

    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        debug_assert_eq!(src.len(), dst.len());
        // INVARIANT: callers pass equal lengths (both are `head_dim` long).
        dst.convert_from_f32_slice(src);
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn widen1(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(ptr: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(ptr.cast()))))
    }

    /// A bf16 is the top half of an f32; a plain shift (which the compiler vectorises) is several
    /// times faster than `half`'s per-element NaN check, and differs only in NaN payloads.
    #[inline]
    fn widen<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        debug_assert_eq!(src.len(), buf.len());
        for (d, s) in buf.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
        buf
    }

    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        debug_assert_eq!(src.len(), dst.len());
        // INVARIANT: callers pass equal lengths (both are `head_dim` long).
        dst.convert_from_f32_slice(src);
    }
}
