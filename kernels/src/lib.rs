//! Sluice's custom candle ops for the paged KV cache, and its CPU matmul.
//!
//! # Layout
//!
//! - [`cache`]: `reshape_and_cache`, which scatters this step's keys and values into their cache
//!   slots in place.
//! - [`attention`]: `paged_attention`, unified prefill + decode attention that reads keys and
//!   values through each sequence's block table.
//! - `attention::cpu`: the CPU body of `paged_attention`, with its fixed-order numerics (a portable
//!   and an AVX-512 body that give the same bits).
//! - [`matmul`]: `PackedLinear`, `y = x · Wᵀ` against a weight packed once as f32, bf16, int8 or
//!   int4 (the last two also straight from GGUF's Q8_0/Q4_1 blocks, keeping their values exactly),
//!   with SIMD kernels (AVX-512, AVX2+FMA, portable) whose rows are bit-identical at any batch size.
//! - [`sampling`]: `top_candidates`, each row's most likely tokens and softmax sums, so that a
//!   sampler on the host needs a few hundred floats of a row instead of the whole vocabulary.
//! - [`activation`]: `silu_mul`, the SwiGLU activation in one pass on the CPU.
//! - [`fused`]: `qkv_rope` and `swiglu`, a layer's elementwise steps in one launch each (for CUDA,
//!   where the engine's small-batch decode step is bound by launches).
//! - [`gemv`]: `y = x · Wᵀ` for up to eight rows against an `(out, in)` weight, a warp per output
//!   column (on CUDA, the engine's projections at small decode batches).
//! - `elem`: the element types the ops accept (f32, f16, bf16) and their widening to f32.
//! - `storage`: borrowing a tensor's CPU storage as a typed slice.
//! - `cuda` (`cuda` feature): the PTX built from `kernels/cuda/*.cu` and the helpers the ops'
//!   CUDA bodies (`cache::cuda`, `attention::cuda`, `fused::cuda`, `gemv::cuda`) share.
//! - `test_util` (tests only): the `test_device!` macro and random tensor helpers.
//!
//! # The KV cache
//!
//! Each layer owns one key pool and one value pool, each a contiguous tensor of shape
//! `(num_blocks, block_size, num_kv_heads, head_dim)`. A *slot* is `block * block_size + offset`,
//! so the pool is also a `(num_slots, num_kv_heads, head_dim)` array indexed by slot.
//!
//! Each op is a candle custom op with a CPU body and, behind the `cuda` feature, a CUDA body
//! (`cuda_fwd`) with the same layouts. The CUDA bodies compile in CI (`make check-cuda`); their tests
//! run on a GPU through `scripts/gpu-proof.sh` (`benches/GPU.md`).

pub mod activation;
pub mod attention;
pub mod cache;
#[cfg(feature = "cuda")]
mod cuda;
mod elem;
pub mod fused;
pub mod gemv;
pub mod matmul;
pub mod sampling;
mod storage;
#[cfg(test)]
mod test_util;

pub use attention::{paged_attention, paged_attention_per_head};
pub use cache::{reshape_and_cache, PAD_SLOT};
pub use matmul::{PackedLinear, WeightFormat};
