// paged_attention: every packed query row attends causally to its own sequence's paged context.
//
// The CUDA body of `sluice_kernels::paged_attention` (`kernels/src/attention.rs`); layouts and
// semantics are documented there. One thread block of `kWarps` warps per (query row, head):
//
// 1. Row -> sequence by binary search in `cu_seqlens_q`; the row sits at position
//    `pos = seq_lens[s] - q_len + (row - cu_seqlens_q[s])` and attends to positions `0..=pos`.
// 2. Positions are cut into tiles of `kTile`; tile `t` belongs to warp `t % kWarps`. A warp scores
//    its tile's positions (lanes split `head_dim`, then a fixed-order warp sum), and folds them into
//    its running softmax state (max `m`, denominator `l`, value accumulator `acc`) in position order.
// 3. The warps' states are merged in warp order 0..kWarps-1 and the row is normalised.
//
// Determinism: how positions are split depends only on the row's own context length, never on the
// rest of the batch, so a row gives the same bits alone or batched, decoded or prefilled, whatever
// the chunking. The result is not bit-identical to the CPU body (a different summation order) but
// agrees with it to f32 rounding; `kernels/src/attention/tests.rs` compares the two.
//
// Bounds: the host has checked the shapes and `head_dim <= kMaxHeadDim`, and (in debug builds) the
// metadata values. The kernel still bounds every index it reads from the metadata: a row whose
// sequence is malformed is written as zeros, and an out-of-range block id is skipped.

#include <math.h>

#include "common.cuh"

namespace {

using sluice::from_f32;
using sluice::kWarpSize;
using sluice::to_f32;
using sluice::warp_sum;

constexpr int kWarps = 4;                           // warps per (row, head)
constexpr int kTile = 8;                            // positions a warp scores together (ILP)
constexpr int kMaxPerLane = 8;                      // head_dim elements per lane
constexpr int kMaxHeadDim = kMaxPerLane * kWarpSize;  // 256; the host checks it
constexpr float kNegInf = -INFINITY;

// The batch metadata and sizes shared by every block of one launch.
struct Params {
    const uint32_t* block_tables;   // (num_seqs, max_blocks_per_seq)
    const uint32_t* cu_seqlens_q;   // (num_seqs + 1,)
    const uint32_t* seq_lens;       // (num_seqs,)
    uint32_t num_seqs;
    uint32_t num_heads;
    uint32_t num_kv_heads;
    uint32_t head_dim;
    uint32_t num_blocks;
    uint32_t block_size;
    uint32_t max_blocks_per_seq;
    float scale;
};

// Where one query row reads its context; `len == 0` marks a malformed row.
struct Row {
    const uint32_t* blocks;         // the sequence's block table row
    uint32_t len;                   // positions attended: pos + 1
};

__device__ Row find_row(const Params& p, uint32_t token) {
    // The last sequence whose rows start at or before `token`: empty sequences before it share its
    // start and are skipped, as on the CPU.
    uint32_t lo = 0, hi = p.num_seqs;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (p.cu_seqlens_q[mid] <= token) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Row row = {nullptr, 0};
    if (lo == 0) {
        return row;
    }
    const uint32_t s = lo - 1;
    const uint32_t start = p.cu_seqlens_q[s], end = p.cu_seqlens_q[s + 1];
    const uint32_t seq_len = p.seq_lens[s];
    if (token < start || token >= end || end - start > seq_len) {
        return row;
    }
    const uint32_t len = seq_len - (end - start) + (token - start) + 1;
    if ((static_cast<uint64_t>(len) + p.block_size - 1) / p.block_size > p.max_blocks_per_seq) {
        return row;
    }
    row.blocks = p.block_tables + static_cast<size_t>(s) * p.max_blocks_per_seq;
    row.len = len;
    return row;
}

template <typename T>
__device__ void paged_attention(
    T* __restrict__ out,            // (num_tokens, num_heads, head_dim)
    const T* __restrict__ q,        // (num_tokens, num_heads, head_dim)
    const T* __restrict__ k_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const T* __restrict__ v_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const Params& p
) {
    __shared__ float part_m[kWarps];
    __shared__ float part_l[kWarps];
    __shared__ float part_acc[kWarps][kMaxHeadDim];

    const uint32_t token = blockIdx.x, head = blockIdx.y;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const size_t q_offset = (static_cast<size_t>(token) * p.num_heads + head) * p.head_dim;
    T* out_row = out + q_offset;

    const Row row = find_row(p, token);  // the same for every thread of the block
    if (row.len == 0) {
        for (uint32_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
            out_row[d] = from_f32<T>(0.f);
        }
        return;
    }

    // This lane's share of the query and of the output: elements lane, lane + 32, ...
    float qr[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const uint32_t d = lane + i * kWarpSize;
        qr[i] = d < p.head_dim ? to_f32(q[q_offset + d]) : 0.f;
        acc[i] = 0.f;
    }
    const uint32_t kv_head = head / (p.num_heads / p.num_kv_heads);
    const size_t slot_stride = static_cast<size_t>(p.num_kv_heads) * p.head_dim;
    const T* k_head = k_cache + static_cast<size_t>(kv_head) * p.head_dim;
    const T* v_head = v_cache + static_cast<size_t>(kv_head) * p.head_dim;

    float m = kNegInf, l = 0.f;
    const uint32_t num_tiles = (row.len + kTile - 1) / kTile;
    for (uint32_t t = warp; t < num_tiles; t += kWarps) {
        // Scores of the tile's positions; every branch here is uniform across the warp.
        float score[kTile];
        size_t offset[kTile];
        bool valid[kTile];
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
            const uint32_t pos = t * kTile + j;
            const uint32_t block = pos < row.len ? row.blocks[pos / p.block_size] : p.num_blocks;
            valid[j] = block < p.num_blocks;
            offset[j] = valid[j] ? (static_cast<size_t>(block) * p.block_size + pos % p.block_size) * slot_stride : 0;
            float partial = 0.f;
            if (valid[j]) {
#pragma unroll
                for (int i = 0; i < kMaxPerLane; ++i) {
                    const uint32_t d = lane + i * kWarpSize;
                    if (d < p.head_dim) {
                        partial += qr[i] * to_f32(k_head[offset[j] + d]);
                    }
                }
            }
            score[j] = partial;
        }
        float tile_max = m;
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
            score[j] = valid[j] ? p.scale * warp_sum(score[j]) : kNegInf;
            tile_max = fmaxf(tile_max, score[j]);
        }
        if (tile_max == kNegInf) {
            continue;  // no readable position in this tile (only with out-of-range block ids)
        }
        // Rescale the running state to the new max, then add the tile in position order.
        const float alpha = expf(m - tile_max);  // 0 on the first tile, where m = -inf
        l *= alpha;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            acc[i] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
            if (!valid[j]) {
                continue;
            }
            const float w = expf(score[j] - tile_max);
            l += w;
#pragma unroll
            for (int i = 0; i < kMaxPerLane; ++i) {
                const uint32_t d = lane + i * kWarpSize;
                if (d < p.head_dim) {
                    acc[i] += w * to_f32(v_head[offset[j] + d]);
                }
            }
        }
        m = tile_max;
    }

    // Merge the warps' states in warp order.
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const uint32_t d = lane + i * kWarpSize;
        if (d < p.head_dim) {
            part_acc[warp][d] = acc[i];
        }
    }
    __syncthreads();
    float max_all = kNegInf;
    for (int w = 0; w < kWarps; ++w) {
        max_all = fmaxf(max_all, part_m[w]);
    }
    float weight[kWarps], sum = 0.f;
    for (int w = 0; w < kWarps; ++w) {
        weight[w] = part_m[w] == kNegInf ? 0.f : expf(part_m[w] - max_all);
        sum += part_l[w] * weight[w];
    }
    for (uint32_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < kWarps; ++w) {
            o += part_acc[w][d] * weight[w];
        }
        out_row[d] = from_f32<T>(sum > 0.f ? o / sum : 0.f);
    }
}

}  // namespace

// Launch: grid (num_tokens, num_heads), block (kWarps * 32). Returned by `paged_attention_config`
// on the Rust side, which must agree with kWarps.
#define SLUICE_PAGED_ATTENTION(T, NAME)                                                                \
    extern "C" __global__ void __launch_bounds__(kWarps * kWarpSize) paged_attention_##NAME(           \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* block_tables,          \
        const uint32_t* cu_seqlens_q, const uint32_t* seq_lens, uint32_t num_seqs, uint32_t num_heads, \
        uint32_t num_kv_heads, uint32_t head_dim, uint32_t num_blocks, uint32_t block_size,            \
        uint32_t max_blocks_per_seq, float scale) {                                                    \
        const Params p = {block_tables, cu_seqlens_q, seq_lens,   num_seqs,           num_heads,       \
                          num_kv_heads, head_dim,     num_blocks, block_size, max_blocks_per_seq, scale}; \
        paged_attention<T>(out, q, k_cache, v_cache, p);                                               \
    }

SLUICE_PAGED_ATTENTION(float, f32)
SLUICE_PAGED_ATTENTION(__half, f16)
SLUICE_PAGED_ATTENTION(__nv_bfloat16, bf16)
