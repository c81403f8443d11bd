//! `gemv_norm_qkv_cache`: an attention layer's input norm, QKV projection, RoPE and cache writes
//! in one launch on CUDA, for the one- and two-row steps of small-batch decoding.

use candle_core::{bail, Tensor};

use super::{checked, gemv_norm, MAX_NORM_ROWS};

/// An attention layer's step beyond its projection: the rotary tables, each row's position, the
/// paged caches and each row's slot, and the head layout. [`gemv_norm_qkv_cache`] rotates q and k
/// by `cos`/`sin` row `positions[i]` and stores k and v in slot `slot_mapping[i]`, as
/// [`crate::fused::qkv_rope_cache`] documents (the same shapes and dtypes).
#[derive(Clone, Copy, Debug)]
pub struct QkvCache<'a> {
    /// `(max_positions, head_dim / 2)`, of the activations' dtype.
    pub cos: &'a Tensor,
    /// `(max_positions, head_dim / 2)`, of the activations' dtype.
    pub sin: &'a Tensor,
    /// `(m,)` U32.
    pub positions: &'a Tensor,
    /// `(num_blocks, block_size, kv_heads, head_dim)`, of the activations' dtype.
    pub key_cache: &'a Tensor,
    /// As `key_cache`.
    pub value_cache: &'a Tensor,
    /// `(m,)` U32; a [`crate::PAD_SLOT`] row is stored nowhere.
    pub slot_mapping: &'a Tensor,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Each head's width (even).
    pub head_dim: usize,
}

/// [`gemv_norm`] against an attention's stacked q/k/v weight `w: ((heads + 2 kv_heads) *
/// head_dim, k)` (the input norm's weight folded in), followed by
/// [`crate::fused::qkv_rope_cache`] on its output: returns the new residual stream (with
/// `residual`, as `gemv_norm`) and q, `(m, heads, head_dim)`, rotated; the rotated k and the v go
/// into their cache slots. On CUDA this is one launch (each warp computes the two products of a
/// RoPE pair and rotates and stores them), with the bits of the two ops in turn; elsewhere it runs
/// the two ops. `1 <= m <= MAX_NORM_ROWS`.
pub fn gemv_norm_qkv_cache(
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    cache: &QkvCache<'_>,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let (m, k) = x.dims2()?;
    let (rows, _) = w.dims2()?;
    let QkvCache { cos, sin, positions, key_cache, value_cache, slot_mapping, heads, kv_heads, head_dim } = *cache;
    let width = (heads + 2 * kv_heads) * head_dim;
    if rows != width || heads == 0 || kv_heads == 0 {
        bail!("gemv_norm_qkv_cache: `w` must have ({heads} + 2 × {kv_heads}) × {head_dim} = {width} rows, got {rows}")
    }
    if !(1..=MAX_NORM_ROWS).contains(&m) {
        bail!("gemv_norm_qkv_cache: takes 1 to {MAX_NORM_ROWS} rows, got ({m}, {k})")
    }
    crate::fused::check_rope_cache_operands(
        (m, x.dtype(), x.device()),
        (cos, sin, positions),
        (key_cache, value_cache, slot_mapping),
        (kv_heads, head_dim),
    )?;
    if !x.device().is_cuda() {
        let (sum, qkv) = gemv_norm(x, residual, w, eps)?;
        let q = crate::fused::qkv_rope_cache(
            &qkv,
            cos,
            sin,
            positions,
            key_cache,
            value_cache,
            slot_mapping,
            (heads, kv_heads, head_dim),
        )?;
        return Ok((sum, q));
    }
    #[cfg(feature = "cuda")]
    {
        let op = GemvNormQkv {
            eps,
            heads,
            kv_heads,
            head_dim,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            positions: positions.contiguous()?,
            slot_mapping: slot_mapping.contiguous()?,
            key_cache: key_cache.clone(),
            value_cache: value_cache.clone(),
        };
        let x_in = checked(x, w)?;
        let q_len = m * heads * head_dim;
        let Some(r) = residual else {
            let q = x_in.apply_op2_no_bwd(w, &op)?;
            return Ok((None, q.reshape((m, heads, head_dim))?));
        };
        super::check_residual("gemv_norm_qkv_cache", x, r)?;
        let r = checked(r, w)?;
        let flat = x_in.apply_op3_no_bwd(&r, w, &op)?;
        let sum = flat.narrow(0, 0, m * k)?.reshape((m, k))?;
        let q = flat.narrow(0, m * k, q_len)?.reshape((m, heads, head_dim))?;
        Ok((Some(sum), q))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = checked;
        bail!("gemv_norm_qkv_cache: no body for {:?}", x.device())
    }
}

/// The fused op: `x` (and the residual) and `w` as operands, the rest held (the caches are written
/// in place, as `reshape_and_cache` writes them).
#[cfg(feature = "cuda")]
pub(super) struct GemvNormQkv {
    pub eps: f32,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cos: Tensor,
    pub sin: Tensor,
    pub positions: Tensor,
    pub slot_mapping: Tensor,
    pub key_cache: Tensor,
    pub value_cache: Tensor,
}

#[cfg(feature = "cuda")]
mod ops {
    use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape};

    use super::GemvNormQkv;

    const ON_CPU: &str =
        "gemv_norm_qkv_cache: the fused op runs on CUDA; the CPU composes gemv_norm and qkv_rope_cache";

    impl CustomOp2 for GemvNormQkv {
        fn name(&self) -> &'static str {
            "sluice-gemv-norm-qkv"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("{ON_CPU}")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            crate::gemv::cuda::gemv_norm_qkv(self, (x, x_l), None, (w, w_l))
        }
    }

    impl CustomOp3 for GemvNormQkv {
        fn name(&self) -> &'static str {
            "sluice-gemv-add-norm-qkv"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("{ON_CPU}")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            r: &CudaStorage,
            r_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            crate::gemv::cuda::gemv_norm_qkv(self, (x, x_l), Some((r, r_l)), (w, w_l))
        }
    }
}
