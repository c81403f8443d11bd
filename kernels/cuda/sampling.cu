// top_candidates: the k largest logits of each row with their ids, and the row's two softmax sums.
//
// The CUDA body of `sluice_kernels::sampling::top_candidates` (`kernels/src/sampling.rs`, which
// describes the output). One block per row:
//
// 1. Radix select on order-preserving integer keys (NaN keyed as -inf, -0 as +0): four passes of 8 bits, each
//    a 256-bin histogram of the keys that share the prefix found so far, find the key `t` of the
//    k-th largest logit and how many logits equal to `t` belong in the head (the lowest ids).
// 2. One pass in id order, a chunk of `blockDim.x` logits at a time, collects the head into shared
//    memory: every key above `t`, and keys equal to `t` until the head is full (a block-wide count
//    of the earlier ones decides, so the same ids are taken on every run).
// 3. A bitonic sort of the head (key descending, id ascending) in shared memory.
// 4. The sums, each thread over a fixed stride of the row, then a fixed tree: the same bits every
//    run for the same row.

#include <math_constants.h>

#include "common.cuh"

namespace {

using sluice::kFullMask;
using sluice::kWarpSize;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxK = 256;  // MAX_CANDIDATES in sampling.rs

// Larger float, larger key; NaN keyed as -inf, -0 as +0 (they compare equal, so ties go by id).
__device__ __forceinline__ uint32_t key_of(float x) {
    if (x != x) {
        x = -CUDART_INF_F;
    }
    if (x == 0.f) {
        x = 0.f;
    }
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float value_of(uint32_t key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Exclusive prefix count of `flag` over the block, in thread order; `total` gets the block's count.
// Every thread must call it.
__device__ __forceinline__ uint32_t block_prefix(bool flag, uint32_t* warp_counts, uint32_t& total) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    if (lane == 0) {
        warp_counts[warp] = __popc(ballot);
    }
    __syncthreads();
    uint32_t before = 0;
    total = 0;
    for (int w = 0; w < kWarps; ++w) {
        before += w < warp ? warp_counts[w] : 0;
        total += warp_counts[w];
    }
    __syncthreads();  // warp_counts is reused by the next call
    return before + __popc(ballot & ((1u << lane) - 1u));
}

__device__ void top_candidates(const float* __restrict__ logits, const float* __restrict__ inv_temps,
                               float* __restrict__ out, uint32_t vocab, uint32_t k) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t warp_counts[kWarps];
    __shared__ uint32_t head_key[kMaxK];
    __shared__ uint32_t head_id[kMaxK];
    __shared__ uint32_t sel_prefix, sel_remaining;
    __shared__ float sums[2][kWarps];

    if (blockDim.x != kThreads) {
        __trap();  // block_prefix and the sums count kWarps warps
    }
    const uint32_t row = blockIdx.x;
    const float* x = logits + static_cast<size_t>(row) * vocab;
    float* o = out + static_cast<size_t>(row) * (2 * k + 2);
    const uint32_t tid = threadIdx.x;

    // 1. The k-th largest key, 8 bits at a time from the top.
    uint32_t prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (uint32_t b = tid; b < 256; b += blockDim.x) {
            hist[b] = 0;
        }
        __syncthreads();
        // Logits share their top bits, so most of a warp hits one bin: one atomic per distinct bin
        // of the warp (every lane runs every round, so the match sees the whole warp).
        for (uint32_t start = 0; start < vocab; start += blockDim.x) {
            const uint32_t i = start + tid;
            const uint32_t key = i < vocab ? key_of(x[i]) : 0u;
            const bool in = i < vocab && (key & mask) == prefix;
            const uint32_t bin = in ? (key >> shift) & 0xffu : 0x100u;
            const unsigned peers = __match_any_sync(kFullMask, bin);
            if (in && static_cast<int>(tid % kWarpSize) == __ffs(peers) - 1) {
                atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
            }
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t above = 0, bin = 0;
            for (int b = 255; b >= 0; --b) {
                if (above + hist[b] >= remaining) {
                    bin = b;
                    break;
                }
                above += hist[b];
            }
            sel_prefix = prefix | (bin << shift);
            sel_remaining = remaining - above;
        }
        __syncthreads();
        prefix = sel_prefix;
        remaining = sel_remaining;
        mask |= 0xffu << shift;
    }
    const uint32_t threshold = prefix;  // the k-th largest key
    const uint32_t equal_wanted = remaining;  // keys equal to it that belong in the head

    // 2. The head, in id order.
    uint32_t taken = 0, equal_seen = 0;
    for (uint32_t start = 0; start < vocab && taken < k; start += blockDim.x) {  // `taken`: same in every thread
        const uint32_t i = start + tid;
        const uint32_t key = i < vocab ? key_of(x[i]) : 0u;
        const bool above = i < vocab && key > threshold;
        const bool equal = i < vocab && key == threshold;
        if (!__syncthreads_or(above || equal)) {
            continue;
        }
        uint32_t equal_total, take_total;
        const uint32_t equal_rank = equal_seen + block_prefix(equal, warp_counts, equal_total);
        const bool take = above || (equal && equal_rank < equal_wanted);
        const uint32_t at = taken + block_prefix(take, warp_counts, take_total);
        if (take && at < k) {
            head_key[at] = key;
            head_id[at] = i;
        }
        taken += take_total;
        equal_seen += equal_total;
    }
    // Pad to a power of two with entries that sort last.
    uint32_t size = 1;
    while (size < k) {
        size *= 2;
    }
    for (uint32_t i = k + tid; i < size; i += blockDim.x) {
        head_key[i] = 0u;
        head_id[i] = 0xffffffffu;
    }
    __syncthreads();

    // 3. Bitonic sort: key descending, then id ascending.
    for (uint32_t len = 2; len <= size; len *= 2) {
        for (uint32_t stride = len / 2; stride > 0; stride /= 2) {
            for (uint32_t i = tid; i < size; i += blockDim.x) {
                const uint32_t j = i ^ stride;
                if (j > i) {
                    const bool first_wins = head_key[i] > head_key[j] || (head_key[i] == head_key[j] && head_id[i] < head_id[j]);
                    const bool descending = (i & len) == 0;  // this half ends up in (key desc, id asc) order
                    if (first_wins != descending) {
                        const uint32_t tk = head_key[i], ti = head_id[i];
                        head_key[i] = head_key[j];
                        head_id[i] = head_id[j];
                        head_key[j] = tk;
                        head_id[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (uint32_t i = tid; i < k; i += blockDim.x) {
        o[i] = value_of(head_key[i]);
        o[k + i] = __uint_as_float(head_id[i]);
    }

    // 4. Σ exp(l - max) and Σ exp((l - max) * inv_t).
    const float max = value_of(head_key[0]);
    const float inv_t = inv_temps[row];
    float s1 = 0.f, st = 0.f;
    if (max > -CUDART_INF_F) {
        for (uint32_t i = tid; i < vocab; i += blockDim.x) {
            const float xi = x[i];
            const float d = (xi != xi ? -CUDART_INF_F : xi) - max;
            s1 += expf(d);
            st += expf(d * inv_t);
        }
    }
    s1 = sluice::warp_sum(s1);
    st = sluice::warp_sum(st);
    if (tid % kWarpSize == 0) {
        sums[0][tid / kWarpSize] = s1;
        sums[1][tid / kWarpSize] = st;
    }
    __syncthreads();
    if (tid == 0) {
        float a = 0.f, b = 0.f;
        for (int w = 0; w < kWarps; ++w) {
            a += sums[0][w];
            b += sums[1][w];
        }
        o[2 * k] = a;
        o[2 * k + 1] = b;
    }
}

// argmax_rows: each row's greedy token, the lowest id holding the row's largest logit (NaN skipped,
// -0 equal to +0), or 0 when nothing is above -inf. One block per row: each thread keeps the first
// best of its strided ids, then (value, id) pairs merge by "larger value, else lower id", which is
// associative and commutative, so the result is exact and the same on every run.
constexpr int kArgmaxThreads = 1024;

__device__ __forceinline__ void better(float& v, uint32_t& id, float other_v, uint32_t other_id) {
    if (other_v > v || (other_v == v && other_id < id)) {
        v = other_v;
        id = other_id;
    }
}

__device__ void argmax_rows(const float* __restrict__ logits, uint32_t* __restrict__ out, uint32_t vocab) {
    __shared__ float warp_v[kArgmaxThreads / sluice::kWarpSize];
    __shared__ uint32_t warp_id[kArgmaxThreads / sluice::kWarpSize];
    const float* row = logits + static_cast<size_t>(blockIdx.x) * vocab;
    float v = -INFINITY;
    uint32_t id = 0xffffffffu;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = row[i];
        if (x > v) {  // false for NaN, and for a later equal value
            v = x;
            id = i;
        }
    }
#pragma unroll
    for (int o = sluice::kWarpSize / 2; o > 0; o /= 2) {
        better(v, id, __shfl_xor_sync(sluice::kFullMask, v, o), __shfl_xor_sync(sluice::kFullMask, id, o));
    }
    const int warp = threadIdx.x / sluice::kWarpSize, lane = threadIdx.x % sluice::kWarpSize;
    const int warps = (blockDim.x + sluice::kWarpSize - 1) / sluice::kWarpSize;
    if (lane == 0) {
        warp_v[warp] = v;
        warp_id[warp] = id;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? warp_v[lane] : -INFINITY;
        id = lane < warps ? warp_id[lane] : 0xffffffffu;
#pragma unroll
        for (int o = sluice::kWarpSize / 2; o > 0; o /= 2) {
            better(v, id, __shfl_xor_sync(sluice::kFullMask, v, o), __shfl_xor_sync(sluice::kFullMask, id, o));
        }
        if (lane == 0) {
            out[blockIdx.x] = v > -INFINITY ? id : 0u;
        }
    }
}

}  // namespace

// Launch: grid (rows), block (kArgmaxThreads), as `kernels/src/sampling/cuda.rs` does.
extern "C" __global__ void __launch_bounds__(kArgmaxThreads)
    argmax_rows_f32(const float* logits, uint32_t* out, uint32_t vocab) {
    argmax_rows(logits, out, vocab);
}

// Launch: grid (rows), block (kThreads), as `kernels/src/sampling/cuda.rs` does; k <= kMaxK.
extern "C" __global__ void __launch_bounds__(kThreads)
    top_candidates_f32(const float* logits, const float* inv_temps, float* out, uint32_t vocab, uint32_t k) {
    top_candidates(logits, inv_temps, out, vocab, k);
}
