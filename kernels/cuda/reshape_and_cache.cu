// reshape_and_cache: scatter this step's keys (or values) into their paged-cache slots.
//
// The CUDA body of `sluice_kernels::reshape_and_cache` (`kernels/src/cache.rs`), one launch per
// cache pool. One thread block per token copies that token's `num_kv_heads * head_dim` elements;
// there is no arithmetic, so the result is bit-identical to the CPU body.
//
// A token whose slot is the padding slot (`PAD_SLOT`, 0xffffffff) is not written.
//
// Bounds: the host has checked the shapes and (in debug builds) every slot. The kernel still skips
// a token whose slot is out of range, so a bad `slot_mapping` can never write outside the pool.

#include "common.cuh"

namespace {

template <typename T>
__device__ void reshape_and_cache(
    T* __restrict__ cache,                  // (num_slots, num_kv_heads, head_dim), contiguous
    const T* __restrict__ src,              // (num_tokens, num_kv_heads, head_dim), strides below
    const uint32_t* __restrict__ slots,     // (num_tokens,)
    size_t num_slots,
    uint32_t num_kv_heads,
    uint32_t head_dim,
    size_t token_stride,                    // elements between tokens of `src`
    size_t head_stride                      // elements between heads of `src`; `head_dim` is dense
) {
    const size_t token = blockIdx.x;
    const uint32_t raw = slots[token];
    const size_t slot = raw;
    if (raw == 0xffffffffu || slot >= num_slots) {
        return;
    }
    const uint32_t row = num_kv_heads * head_dim;
    T* dst = cache + slot * row;
    const T* from = src + token * token_stride;
    for (uint32_t i = threadIdx.x; i < row; i += blockDim.x) {
        const uint32_t h = i / head_dim, d = i % head_dim;
        dst[i] = from[h * head_stride + d];
    }
}

}  // namespace

#define SLUICE_RESHAPE_AND_CACHE(T, NAME)                                                              \
    extern "C" __global__ void reshape_and_cache_##NAME(                                               \
        T* cache, const T* src, const uint32_t* slots, size_t num_slots, uint32_t num_kv_heads,        \
        uint32_t head_dim, size_t token_stride, size_t head_stride) {                                  \
        reshape_and_cache<T>(cache, src, slots, num_slots, num_kv_heads, head_dim, token_stride,       \
                             head_stride);                                                             \
    }

SLUICE_RESHAPE_AND_CACHE(float, f32)
SLUICE_RESHAPE_AND_CACHE(__half, f16)
SLUICE_RESHAPE_AND_CACHE(__nv_bfloat16, bf16)
