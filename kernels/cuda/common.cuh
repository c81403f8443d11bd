// Shared by Sluice's kernels: element widening/narrowing and a fixed-order warp sum.
//
// Every kernel is `extern "C"` and named `<op>_<dtype>` (f32, f16, bf16) so the Rust side can load
// it by name from the embedded PTX (see `kernels/src/cuda.rs`).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace sluice {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Exact widening of a cache or activation element to f32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even narrowing from f32 (as `half`'s `from_f32` on the CPU).
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Sum of `x` over the 32 lanes of a warp, returned to every lane. A xor butterfly: at each level a
// lane adds its partner's partial to its own, and since `a + b == b + a` exactly, every lane ends
// with the same bits, which depend only on the 32 inputs, never on timing.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        x += __shfl_xor_sync(kFullMask, x, offset);
    }
    return x;
}

// The slot mapping's padding slot (`PAD_SLOT` in `kernels/src/cache.rs`): a row stored nowhere.
constexpr uint32_t kPadSlot = 0xffffffffu;

// The rotation of a RoPE pair, each product and sum rounded on its own (no contraction into an FMA,
// which the compiler could do differently in two kernels): the same bits in `qkv_rope`,
// `qkv_rope_cache` and gemv's QKV epilogue, and as the CPU body computes them.
__device__ __forceinline__ float rotate_first(float x1, float x2, float cc, float ss) {
    return __fsub_rn(__fmul_rn(x1, cc), __fmul_rn(x2, ss));
}
__device__ __forceinline__ float rotate_second(float x1, float x2, float cc, float ss) {
    return __fadd_rn(__fmul_rn(x2, cc), __fmul_rn(x1, ss));
}

}  // namespace sluice
