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
}

impl Elem for f32 {
    #[inline]
    fn widen<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

macro_rules! half_elem {
    ($ty:ty) => {
        impl Elem for $ty {
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
    };
}

half_elem!(f16);
half_elem!(bf16);
