// paged_attention: every packed query row attends causally to its own sequence's paged context.
//
// The CUDA body of `sluice_kernels::paged_attention` (`kernels/src/attention.rs`); layouts and
// semantics are documented there. Two kernels: `paged_attention_<T>`, one thread block of `kWarps`
// warps per (query row, head), the heads of a row in consecutive blocks so that a GQA group's heads
// read the same K/V rows close together in time (the re-reads come from L2); and, below,
// `paged_attention_g<G>_<T>`, one block per (query row, kv head) for the G heads sharing it. The
// per-head kernel:
//
// 1. Row -> sequence by binary search in `cu_seqlens_q`; the row sits at position
//    `pos = seq_lens[s] - q_len + (row - cu_seqlens_q[s])` and attends to positions `0..=pos`.
//    The query is widened into shared memory.
// 2. Positions are cut into tiles of 32; tile `t` belongs to warp `t % kWarps`. Each lane scores one
//    position of the tile (a whole key row, read 16 bytes at a time where the layout allows), the
//    warp takes the tile's max and folds the tile into its running softmax state (max `m`,
//    denominator `l`), then accumulates the value rows in position order, each lane owning
//    `ceil(head_dim / 32)` consecutive output elements (so a value row is read coalesced).
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
using sluice::kFullMask;
using sluice::kWarpSize;
using sluice::to_f32;
using sluice::warp_sum;

// Warps per (row, head): eight, so that at small batches (a few blocks on a GPU of 132 SMs) a row of
// 256 positions has a warp per tile; its state is merged from eight warps instead of four.
constexpr int kWarps = 8;
constexpr int kTile = kWarpSize;                       // positions a warp scores at once, one a lane
constexpr int kMaxPerLane = 8;                         // output elements per lane
constexpr int kMaxHeadDim = kMaxPerLane * kWarpSize;   // 256; the host checks it
constexpr float kNegInf = -INFINITY;

// The larger of `a` and `b`, NaN if either is (`fmaxf` would drop a NaN score, and with it the
// NaN the CPU body and every reference give for that row).
__device__ __forceinline__ float max_nan(float a, float b) { return a != a ? a : (b != b ? b : fmaxf(a, b)); }

// Elements of T in one 16-byte load.
template <typename T> struct Vec16 { static constexpr int kLen = 16 / sizeof(T); };

// 16 bytes at `p` (16-byte aligned) widened to f32.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::kLen; ++i) {
        out[i] = to_f32(e[i]);
    }
}

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

// Lane `lane`'s position in tile `t` of `row`: whether its key/value rows are readable, and their
// offset from the kv head's first row (0 when not readable).
struct Slot {
    bool valid;
    unsigned long long offset;
};

__device__ __forceinline__ Slot lane_slot(const Params& p, const Row& row, uint32_t t, int lane, size_t slot_stride) {
    const uint32_t pos = t * kTile + lane;
    const uint32_t block = pos < row.len ? row.blocks[pos / p.block_size] : p.num_blocks;
    const bool valid = block < p.num_blocks;
    const unsigned long long offset =
        valid ? (static_cast<unsigned long long>(block) * p.block_size + pos % p.block_size) * slot_stride : 0;
    return {valid, offset};
}

// q . k for one key row, in a fixed order: `kLen` running partial sums over 16-byte chunks where
// the row is aligned for them, else one sum element by element.
template <typename T, int kHeadDim>
__device__ __forceinline__ float dot_row(const float* q, const T* k, uint32_t head_dim, bool vectorised) {
    constexpr int kLen = Vec16<T>::kLen;
    if (kHeadDim != 0) {
        head_dim = kHeadDim;  // a constant: the loop below unrolls and its loads issue together
    }
    if (vectorised) {
        float part[kLen];
#pragma unroll
        for (int i = 0; i < kLen; ++i) {
            part[i] = 0.f;
        }
#pragma unroll
        for (uint32_t d = 0; d < head_dim; d += kLen) {
            float kv[kLen];
            load16(k + d, kv);
#pragma unroll
            for (int i = 0; i < kLen; ++i) {
                part[i] += q[d + i] * kv[i];
            }
        }
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kLen; ++i) {
            dot += part[i];
        }
        return dot;
    }
    float dot = 0.f;
    for (uint32_t d = 0; d < head_dim; ++d) {
        dot += q[d] * to_f32(k[d]);
    }
    return dot;
}

// One block's shared memory: the widened query row and the warps' softmax states.
struct Shared {
    float q_row[kMaxHeadDim];
    float part_m[kWarps];
    float part_l[kWarps];
    float part_acc[kWarps][kMaxHeadDim];
};

// `kHeadDim` is `p.head_dim` as a constant for the common sizes (64, 128), so that the loops over
// a row unroll; 0 reads it from `p` (any size up to kMaxHeadDim). Same arithmetic either way.
template <typename T, int kHeadDim>
__device__ void paged_attention(
    T* __restrict__ out,            // (num_tokens, num_heads, head_dim)
    const T* __restrict__ q,        // (num_tokens, num_heads, head_dim)
    const T* __restrict__ k_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const T* __restrict__ v_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const Params& p,
    Shared& sh
) {
    float* q_row = sh.q_row;
    float* part_m = sh.part_m;
    float* part_l = sh.part_l;
    auto& part_acc = sh.part_acc;
    const uint32_t head_dim = kHeadDim != 0 ? kHeadDim : p.head_dim;

    // Heads of one row in consecutive blocks (the grid is 1-D: num_tokens * num_heads).
    const uint32_t token = blockIdx.x / p.num_heads, head = blockIdx.x % p.num_heads;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const size_t q_offset = (static_cast<size_t>(token) * p.num_heads + head) * head_dim;
    T* out_row = out + q_offset;

    const Row row = find_row(p, token);  // the same for every thread of the block
    if (row.len == 0) {
        for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
            out_row[d] = from_f32<T>(0.f);
        }
        return;
    }
    for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
        q_row[d] = to_f32(q[q_offset + d]);
    }
    __syncthreads();

    const uint32_t kv_head = head / (p.num_heads / p.num_kv_heads);
    const size_t slot_stride = static_cast<size_t>(p.num_kv_heads) * head_dim;
    const T* k_head = k_cache + static_cast<size_t>(kv_head) * head_dim;
    const T* v_head = v_cache + static_cast<size_t>(kv_head) * head_dim;
    // Every key row starts 16-byte aligned when the cache does and rows are whole 16-byte chunks.
    const bool vectorised = head_dim % Vec16<T>::kLen == 0 && reinterpret_cast<uintptr_t>(k_cache) % 16 == 0;
    // This lane's output elements: lane * per .. lane * per + per - 1 (those below head_dim).
    const uint32_t per = (head_dim + kWarpSize - 1) / kWarpSize;
    const uint32_t first = lane * per;

    float acc[kMaxPerLane];
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        acc[i] = 0.f;
    }
    float m = kNegInf, l = 0.f;
    const uint32_t num_tiles = (row.len + kTile - 1) / kTile;
    for (uint32_t t = warp; t < num_tiles; t += kWarps) {
        // This lane's position: its key row's offset and its score.
        const auto [valid, offset] = lane_slot(p, row, t, lane, slot_stride);
        const float score = valid ? p.scale * dot_row<T, kHeadDim>(q_row, k_head + offset, head_dim, vectorised) : kNegInf;

        float tile_max = score;
#pragma unroll
        for (int o = kWarpSize / 2; o > 0; o /= 2) {
            tile_max = max_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, o));
        }
        if (tile_max == kNegInf) {
            continue;  // no readable position in this tile (only with out-of-range block ids)
        }
        // Rescale the running state to the new max, then add the tile in position order.
        const float m_new = max_nan(m, tile_max);
        const float alpha = expf(m - m_new);  // 0 on the first tile, where m = -inf
        const float w = valid ? expf(score - m_new) : 0.f;
        l = l * alpha + warp_sum(w);
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i) {
            acc[i] *= alpha;
        }
        // Unreadable positions have weight 0 and offset 0 (a readable row: this tile has a readable
        // position, so the pool has a block 0); their value is loaded but not added, so that the
        // loop has no branch and its loads can all be in flight at once.
#pragma unroll
        for (int j = 0; j < kTile; ++j) {
            const float wj = __shfl_sync(kFullMask, w, j);
            const unsigned long long oj = __shfl_sync(kFullMask, offset, j);
            const T* v = v_head + oj;
#pragma unroll
            for (int i = 0; i < kMaxPerLane; ++i) {
                const uint32_t d = first + i;
                if (i < per && d < head_dim) {
                    const float x = to_f32(v[d]);
                    acc[i] = wj != 0.f ? acc[i] + wj * x : acc[i];
                }
            }
        }
        m = m_new;
    }

    // Merge the warps' states in warp order.
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
        const uint32_t d = first + i;
        if (i < per && d < head_dim) {
            part_acc[warp][d] = acc[i];
        }
    }
    __syncthreads();
    float max_all = kNegInf;
    for (int w = 0; w < kWarps; ++w) {
        max_all = max_nan(max_all, part_m[w]);
    }
    float weight[kWarps], sum = 0.f;
    for (int w = 0; w < kWarps; ++w) {
        weight[w] = part_m[w] == kNegInf ? 0.f : expf(part_m[w] - max_all);
        sum += part_l[w] * weight[w];
    }
    for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < kWarps; ++w) {
            o += part_acc[w][d] * weight[w];
        }
        // `sum` is 0 only when no position was readable (a malformed row: zeros); a NaN score makes
        // it NaN, which must reach the output as on the CPU, not turn into zeros.
        out_row[d] = from_f32<T>(sum != 0.f ? o / sum : 0.f);
    }
}

// --- The grouped variant: one block per (query row, kv head) for all `kGroup` query heads that
// share that kv head (GQA). Each key and value row is read once for the group instead of once per
// head; otherwise the same algorithm (tiles of 32 positions, tile `t` to warp `t % kWarps`, lane =
// position for the scores, lane = output elements for the values, warps merged in order), so it is
// as batch-invariant as the per-head kernel. Its scores sum a row in two interleaved halves
// (registers), so its bits differ from the per-head kernel's by f32 rounding; a model always runs
// the same one (the host picks by shape).

constexpr int kGroupMaxHeadDim = 128;  // the host sends larger heads to the per-head kernel

template <int kGroup>
struct GroupShared {
    float q_rows[kGroup][kGroupMaxHeadDim];
    float part_m[kWarps][kGroup];
    float part_l[kWarps][kGroup];
    float part_acc[kWarps][kGroup][kGroupMaxHeadDim];
};

template <typename T, int kHeadDim, int kGroup>
__device__ void paged_attention_grouped(
    T* __restrict__ out,            // (num_tokens, num_heads, head_dim)
    const T* __restrict__ q,        // (num_tokens, num_heads, head_dim)
    const T* __restrict__ k_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const T* __restrict__ v_cache,  // (num_blocks, block_size, num_kv_heads, head_dim)
    const Params& p,
    GroupShared<kGroup>& sh
) {
    constexpr int kPerMax = kGroupMaxHeadDim / kWarpSize;  // output elements per lane and head
    const uint32_t head_dim = kHeadDim != 0 ? kHeadDim : p.head_dim;
    // Rows' kv heads in consecutive blocks (the grid is 1-D: num_tokens * num_kv_heads).
    const uint32_t token = blockIdx.x / p.num_kv_heads, kv_head = blockIdx.x % p.num_kv_heads;
    const uint32_t head0 = kv_head * kGroup;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const size_t q_offset = (static_cast<size_t>(token) * p.num_heads + head0) * head_dim;
    T* out_rows = out + q_offset;  // the group's heads are consecutive: kGroup * head_dim elements

    const Row row = find_row(p, token);  // the same for every thread of the block
    if (row.len == 0) {
        for (uint32_t d = threadIdx.x; d < kGroup * head_dim; d += blockDim.x) {
            out_rows[d] = from_f32<T>(0.f);
        }
        return;
    }
    for (uint32_t d = threadIdx.x; d < kGroup * head_dim; d += blockDim.x) {
        sh.q_rows[d / head_dim][d % head_dim] = to_f32(q[q_offset + d]);
    }
    __syncthreads();

    const size_t slot_stride = static_cast<size_t>(p.num_kv_heads) * head_dim;
    const T* k_head = k_cache + static_cast<size_t>(kv_head) * head_dim;
    const T* v_head = v_cache + static_cast<size_t>(kv_head) * head_dim;
    const bool vectorised = head_dim % Vec16<T>::kLen == 0 && reinterpret_cast<uintptr_t>(k_cache) % 16 == 0;
    const uint32_t per = (head_dim + kWarpSize - 1) / kWarpSize;
    const uint32_t first = lane * per;

    float acc[kGroup][kPerMax];
    float m[kGroup], l[kGroup];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
        m[g] = kNegInf;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < kPerMax; ++i) {
            acc[g][i] = 0.f;
        }
    }
    const uint32_t num_tiles = (row.len + kTile - 1) / kTile;
    for (uint32_t t = warp; t < num_tiles; t += kWarps) {
        const auto [valid, offset] = lane_slot(p, row, t, lane, slot_stride);
        // This lane's key row against every head of the group, read once.
        float score[kGroup];
        {
            float even[kGroup], odd[kGroup];
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
                even[g] = 0.f;
                odd[g] = 0.f;
            }
            if (valid) {
                const T* k = k_head + offset;
                if (vectorised) {
                    constexpr int kLen = Vec16<T>::kLen;
#pragma unroll
                    for (uint32_t d = 0; d < head_dim; d += kLen) {
                        float kv[kLen];
                        load16(k + d, kv);
#pragma unroll
                        for (int i = 0; i < kLen; i += 2) {
#pragma unroll
                            for (int g = 0; g < kGroup; ++g) {
                                even[g] += sh.q_rows[g][d + i] * kv[i];
                                odd[g] += sh.q_rows[g][d + i + 1] * kv[i + 1];
                            }
                        }
                    }
                } else {
                    for (uint32_t d = 0; d < head_dim; ++d) {
                        const float kd = to_f32(k[d]);
#pragma unroll
                        for (int g = 0; g < kGroup; ++g) {
                            even[g] += sh.q_rows[g][d] * kd;
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
                score[g] = valid ? p.scale * (even[g] + odd[g]) : kNegInf;
            }
        }
        if (!__any_sync(kFullMask, valid)) {
            continue;  // no readable position in this tile (only with out-of-range block ids)
        }
        float w[kGroup];
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
            float tile_max = score[g];
#pragma unroll
            for (int o = kWarpSize / 2; o > 0; o /= 2) {
                tile_max = max_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, o));
            }
            // Rescale the head's running state to the new max, then weigh the tile's positions.
            const float m_new = max_nan(m[g], tile_max);
            const float alpha = m_new == kNegInf ? 1.f : expf(m[g] - m_new);  // 0 on a first tile
            w[g] = valid && m_new != kNegInf ? expf(score[g] - m_new) : 0.f;
            l[g] = l[g] * alpha + warp_sum(w[g]);
#pragma unroll
            for (int i = 0; i < kPerMax; ++i) {
                acc[g][i] *= alpha;
            }
            m[g] = m_new;
        }
        // Each value row once for the group; unreadable positions (weight 0, offset 0: a readable
        // row) are loaded but not added.
#pragma unroll 8
        for (int j = 0; j < kTile; ++j) {
            const unsigned long long oj = __shfl_sync(kFullMask, offset, j);
            float wj[kGroup];
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
                wj[g] = __shfl_sync(kFullMask, w[g], j);
            }
            const T* v = v_head + oj;
#pragma unroll
            for (int i = 0; i < kPerMax; ++i) {
                const uint32_t d = first + i;
                if (i < per && d < head_dim) {
                    const float x = to_f32(v[d]);
#pragma unroll
                    for (int g = 0; g < kGroup; ++g) {
                        acc[g][i] = wj[g] != 0.f ? acc[g][i] + wj[g] * x : acc[g][i];
                    }
                }
            }
        }
    }

    // Merge the warps' states in warp order, head by head.
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
            sh.part_m[warp][g] = m[g];
            sh.part_l[warp][g] = l[g];
        }
    }
#pragma unroll
    for (int i = 0; i < kPerMax; ++i) {
        const uint32_t d = first + i;
        if (i < per && d < head_dim) {
#pragma unroll
            for (int g = 0; g < kGroup; ++g) {
                sh.part_acc[warp][g][d] = acc[g][i];
            }
        }
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < kGroup * head_dim; e += blockDim.x) {
        const uint32_t g = e / head_dim, d = e % head_dim;
        float max_all = kNegInf;
        for (int wi = 0; wi < kWarps; ++wi) {
            max_all = max_nan(max_all, sh.part_m[wi][g]);
        }
        float o = 0.f, sum = 0.f;
        for (int wi = 0; wi < kWarps; ++wi) {
            const float weight = sh.part_m[wi][g] == kNegInf ? 0.f : expf(sh.part_m[wi][g] - max_all);
            sum += sh.part_l[wi][g] * weight;
            o += sh.part_acc[wi][g][d] * weight;
        }
        out_rows[e] = from_f32<T>(sum != 0.f ? o / sum : 0.f);  // NaN stays NaN (see above)
    }
}

}  // namespace

// Launch: grid (num_tokens * num_heads), block (kWarps * 32). Returned by `paged_attention_config`
// on the Rust side, which must agree with kWarps.
#define SLUICE_PAGED_ATTENTION(T, NAME)                                                                \
    extern "C" __global__ void __launch_bounds__(kWarps * kWarpSize) paged_attention_##NAME(           \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* block_tables,          \
        const uint32_t* cu_seqlens_q, const uint32_t* seq_lens, uint32_t num_seqs, uint32_t num_heads, \
        uint32_t num_kv_heads, uint32_t head_dim, uint32_t num_blocks, uint32_t block_size,            \
        uint32_t max_blocks_per_seq, float scale) {                                                    \
        const Params p = {block_tables, cu_seqlens_q, seq_lens,   num_seqs,           num_heads,       \
                          num_kv_heads, head_dim,     num_blocks, block_size, max_blocks_per_seq, scale}; \
        __shared__ Shared sh;                                                                          \
        if (head_dim == 64) {                                                                          \
            paged_attention<T, 64>(out, q, k_cache, v_cache, p, sh);                                   \
        } else if (head_dim == 128) {                                                                  \
            paged_attention<T, 128>(out, q, k_cache, v_cache, p, sh);                                  \
        } else {                                                                                       \
            paged_attention<T, 0>(out, q, k_cache, v_cache, p, sh);                                    \
        }                                                                                              \
    }

SLUICE_PAGED_ATTENTION(float, f32)
SLUICE_PAGED_ATTENTION(__half, f16)
SLUICE_PAGED_ATTENTION(__nv_bfloat16, bf16)

// Launch: grid (num_tokens * num_kv_heads), block (kWarps * 32); only for num_heads = G *
// num_kv_heads and head_dim <= kGroupMaxHeadDim (the host checks both).
#define SLUICE_PAGED_ATTENTION_GROUPED(T, NAME, G)                                                     \
    extern "C" __global__ void __launch_bounds__(kWarps * kWarpSize) paged_attention_g##G##_##NAME(   \
        T* out, const T* q, const T* k_cache, const T* v_cache, const uint32_t* block_tables,          \
        const uint32_t* cu_seqlens_q, const uint32_t* seq_lens, uint32_t num_seqs, uint32_t num_heads, \
        uint32_t num_kv_heads, uint32_t head_dim, uint32_t num_blocks, uint32_t block_size,            \
        uint32_t max_blocks_per_seq, float scale) {                                                    \
        const Params p = {block_tables, cu_seqlens_q, seq_lens,   num_seqs,           num_heads,       \
                          num_kv_heads, head_dim,     num_blocks, block_size, max_blocks_per_seq, scale}; \
        __shared__ GroupShared<G> sh;                                                                  \
        if (head_dim == 64) {                                                                          \
            paged_attention_grouped<T, 64, G>(out, q, k_cache, v_cache, p, sh);                        \
        } else if (head_dim == 128) {                                                                  \
            paged_attention_grouped<T, 128, G>(out, q, k_cache, v_cache, p, sh);                       \
        } else {                                                                                       \
            paged_attention_grouped<T, 0, G>(out, q, k_cache, v_cache, p, sh);                         \
        }                                                                                              \
    }
#define SLUICE_PAGED_ATTENTION_GROUPS(T, NAME)                                                         \
    SLUICE_PAGED_ATTENTION_GROUPED(T, NAME, 2)                                                         \
    SLUICE_PAGED_ATTENTION_GROUPED(T, NAME, 3)                                                         \
    SLUICE_PAGED_ATTENTION_GROUPED(T, NAME, 4)                                                         \
    SLUICE_PAGED_ATTENTION_GROUPED(T, NAME, 8)

SLUICE_PAGED_ATTENTION_GROUPS(float, f32)
SLUICE_PAGED_ATTENTION_GROUPS(__half, f16)
SLUICE_PAGED_ATTENTION_GROUPS(__nv_bfloat16, bf16)
