// Elementwise steps of a Llama layer fused into one launch each, for the CUDA engine (where every
// separate candle op costs a launch and a pass over memory):
//
// - qkv_rope: the fused QKV projection's output `(n, (heads + 2 * kv_heads) * head_dim)` split into
//   q, k and v with rotary embeddings applied to q and k (half-split pairs, as candle's `rope_thd`),
//   written as three contiguous planes of one buffer: q `(n, heads, head_dim)`, then k and v
//   `(n, kv_heads, head_dim)`.
// - qkv_rope_cache: the same, with the rotary tables gathered by position inside the kernel and k
//   and v written straight into their paged-cache slots (qkv_rope + reshape_and_cache in one launch,
//   instead of two gathers, one split and two scatters).
// - swiglu: `(n, 2 * inter)` (gate, then up, per row) -> `(n, inter)` of `silu(gate) * up`.
// - add_rms_norm: the residual sum `s = x + y` (rounded to T, as a separate add would store it) and
//   `rms_norm(s) * weight`, as two contiguous planes of one buffer: s, then the normed rows.
//
// The CUDA bodies of `sluice_kernels::fused` (`kernels/src/fused.rs`); arithmetic in f32, one
// rounding to the element type at the end (the CPU bodies there compute the same formulas).

#include <math.h>

#include "common.cuh"

namespace {

using sluice::from_f32;
using sluice::kPadSlot;
using sluice::rotate_first;
using sluice::rotate_second;
using sluice::to_f32;

// One block per row.
template <typename T>
__device__ void qkv_rope(T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ cos,
                         const T* __restrict__ sin, uint32_t n, uint32_t heads, uint32_t kv_heads,
                         uint32_t head_dim) {
    const uint32_t row = blockIdx.x;
    const uint32_t half = head_dim / 2;
    const size_t width = static_cast<size_t>(heads + 2 * kv_heads) * head_dim;
    const T* x = qkv + row * width;
    const T* c = cos + static_cast<size_t>(row) * half;
    const T* s = sin + static_cast<size_t>(row) * half;
    T* q_out = out + static_cast<size_t>(row) * heads * head_dim;
    T* k_out = out + static_cast<size_t>(n) * heads * head_dim + static_cast<size_t>(row) * kv_heads * head_dim;
    T* v_out = out + static_cast<size_t>(n) * (heads + kv_heads) * head_dim +
               static_cast<size_t>(row) * kv_heads * head_dim;
    // Pairs (i, i + half) of every q and k head.
    const uint32_t pairs = (heads + kv_heads) * half;
    for (uint32_t p = threadIdx.x; p < pairs; p += blockDim.x) {
        const uint32_t h = p / half, i = p % half;
        const T* src = x + static_cast<size_t>(h) * head_dim;
        const float x1 = to_f32(src[i]), x2 = to_f32(src[i + half]);
        const float cc = to_f32(c[i]), ss = to_f32(s[i]);
        T* dst = h < heads ? q_out + static_cast<size_t>(h) * head_dim
                           : k_out + static_cast<size_t>(h - heads) * head_dim;
        dst[i] = from_f32<T>(rotate_first(x1, x2, cc, ss));
        dst[i + half] = from_f32<T>(rotate_second(x1, x2, cc, ss));
    }
    const uint32_t v_len = kv_heads * head_dim;
    const T* v_in = x + static_cast<size_t>(heads + kv_heads) * head_dim;
    for (uint32_t j = threadIdx.x; j < v_len; j += blockDim.x) {
        v_out[j] = v_in[j];
    }
}

// qkv_rope with the tables gathered by position and k, v stored straight into their cache slots:
// one block per row. Row `r` rotates by `cos_table`/`sin_table` row `positions[r]` (a row at a
// position past the tables is malformed: its q is written as zeros and nothing is stored) and
// writes q into `q_out` (n, heads, head_dim); its rotated k and its v go to slot `slots[r]` of the
// caches (num_slots, kv_heads, head_dim), unless the slot is PAD_SLOT or out of range. Every value
// is computed as `qkv_rope` computes it, so q and the cache rows are the same bits as `qkv_rope`
// followed by `reshape_and_cache`.
template <typename T>
__device__ void qkv_rope_cache(T* __restrict__ q_out, T* __restrict__ k_cache, T* __restrict__ v_cache,
                               const T* __restrict__ qkv, const T* __restrict__ cos_table,
                               const T* __restrict__ sin_table, const uint32_t* __restrict__ positions,
                               const uint32_t* __restrict__ slots, uint32_t heads, uint32_t kv_heads,
                               uint32_t head_dim, uint32_t max_positions, size_t num_slots) {
    const uint32_t row = blockIdx.x;
    const uint32_t half = head_dim / 2;
    const size_t width = static_cast<size_t>(heads + 2 * kv_heads) * head_dim;
    const T* x = qkv + row * width;
    T* q_row = q_out + static_cast<size_t>(row) * heads * head_dim;
    const uint32_t pos = positions[row];
    const uint32_t raw_slot = slots[row];
    const bool in_table = pos < max_positions;
    const bool store = in_table && raw_slot != kPadSlot && static_cast<size_t>(raw_slot) < num_slots;
    const size_t slot_row = static_cast<size_t>(raw_slot) * kv_heads * head_dim;
    if (!in_table) {
        for (uint32_t j = threadIdx.x; j < heads * head_dim; j += blockDim.x) {
            q_row[j] = from_f32<T>(0.f);
        }
        return;
    }
    const T* c = cos_table + static_cast<size_t>(pos) * half;
    const T* s = sin_table + static_cast<size_t>(pos) * half;
    const uint32_t pairs = (heads + (store ? kv_heads : 0)) * half;
    for (uint32_t p = threadIdx.x; p < pairs; p += blockDim.x) {
        const uint32_t h = p / half, i = p % half;
        const T* src = x + static_cast<size_t>(h) * head_dim;
        const float x1 = to_f32(src[i]), x2 = to_f32(src[i + half]);
        const float cc = to_f32(c[i]), ss = to_f32(s[i]);
        T* dst = h < heads ? q_row + static_cast<size_t>(h) * head_dim
                           : k_cache + slot_row + static_cast<size_t>(h - heads) * head_dim;
        dst[i] = from_f32<T>(rotate_first(x1, x2, cc, ss));
        dst[i + half] = from_f32<T>(rotate_second(x1, x2, cc, ss));
    }
    if (store) {
        const uint32_t v_len = kv_heads * head_dim;
        const T* v_in = x + static_cast<size_t>(heads + kv_heads) * head_dim;
        for (uint32_t j = threadIdx.x; j < v_len; j += blockDim.x) {
            v_cache[slot_row + j] = v_in[j];
        }
    }
}

// A grid-stride loop over the `n * inter` outputs.
template <typename T>
__device__ void swiglu(T* __restrict__ out, const T* __restrict__ gate_up, uint32_t n, uint32_t inter) {
    const size_t total = static_cast<size_t>(n) * inter;
    for (size_t e = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
         e += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const size_t r = e / inter, j = e % inter;
        const float g = to_f32(gate_up[r * 2 * inter + j]);
        const float u = to_f32(gate_up[r * 2 * inter + inter + j]);
        out[e] = from_f32<T>(g / (1.f + expf(-g)) * u);
    }
}

// One block per row; the block's threads sum the squares in a fixed order (each thread its
// columns, then the warps, then warp 0 over the warps' sums).
template <typename T>
__device__ void add_rms_norm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y,
                             const T* __restrict__ weight, uint32_t n, uint32_t hidden, float eps) {
    __shared__ float warp_sums[32];
    const size_t row = blockIdx.x;
    T* sum_row = out + row * hidden;
    T* norm_row = out + static_cast<size_t>(n) * hidden + row * hidden;
    float squares = 0.f;
    for (uint32_t c = threadIdx.x; c < hidden; c += blockDim.x) {
        const T s = from_f32<T>(to_f32(x[row * hidden + c]) + to_f32(y[row * hidden + c]));
        sum_row[c] = s;
        const float f = to_f32(s);
        squares += f * f;
    }
    squares = sluice::warp_sum(squares);
    const int warp = threadIdx.x / sluice::kWarpSize, lane = threadIdx.x % sluice::kWarpSize;
    const int warps = (blockDim.x + sluice::kWarpSize - 1) / sluice::kWarpSize;
    if (lane == 0) {
        warp_sums[warp] = squares;
    }
    __syncthreads();
    if (warp == 0) {
        squares = sluice::warp_sum(lane < warps ? warp_sums[lane] : 0.f);
        if (lane == 0) {
            warp_sums[0] = squares;
        }
    }
    __syncthreads();
    const float scale = rsqrtf(warp_sums[0] / static_cast<float>(hidden) + eps);
    for (uint32_t c = threadIdx.x; c < hidden; c += blockDim.x) {
        norm_row[c] = from_f32<T>(scale * to_f32(sum_row[c]) * to_f32(weight[c]));
    }
}

}  // namespace

#define SLUICE_FUSED(T, NAME)                                                                          \
    extern "C" __global__ void qkv_rope_##NAME(T* out, const T* qkv, const T* cos, const T* sin,       \
                                                uint32_t n, uint32_t heads, uint32_t kv_heads,          \
                                                uint32_t head_dim) {                                    \
        qkv_rope<T>(out, qkv, cos, sin, n, heads, kv_heads, head_dim);                                  \
    }                                                                                                  \
    extern "C" __global__ void qkv_rope_cache_##NAME(                                                  \
        T* q_out, T* k_cache, T* v_cache, const T* qkv, const T* cos_table, const T* sin_table,        \
        const uint32_t* positions, const uint32_t* slots, uint32_t heads, uint32_t kv_heads,           \
        uint32_t head_dim, uint32_t max_positions, size_t num_slots) {                                 \
        qkv_rope_cache<T>(q_out, k_cache, v_cache, qkv, cos_table, sin_table, positions, slots, heads,  \
                          kv_heads, head_dim, max_positions, num_slots);                               \
    }                                                                                                  \
    extern "C" __global__ void swiglu_##NAME(T* out, const T* gate_up, uint32_t n, uint32_t inter) {   \
        swiglu<T>(out, gate_up, n, inter);                                                             \
    }                                                                                                  \
    extern "C" __global__ void add_rms_norm_##NAME(T* out, const T* x, const T* y, const T* weight,    \
                                                    uint32_t n, uint32_t hidden, float eps) {           \
        add_rms_norm<T>(out, x, y, weight, n, hidden, eps);                                            \
    }

SLUICE_FUSED(float, f32)
SLUICE_FUSED(__half, f16)
SLUICE_FUSED(__nv_bfloat16, bf16)
