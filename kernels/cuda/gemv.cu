// gemv: `y = x · Wᵀ` for a few rows, the shape of a decode step's projections at small batch.
//
// The CUDA body of `sluice_kernels::gemv` (`kernels/src/gemv.rs`, which documents the operands):
// `x` (m, k) with 1 <= m <= kMaxRows, `w` (n, k) row-major (a Hugging Face weight as stored), `y`
// (m, n); one dtype (f32, f16 or bf16), f32 accumulation, one rounding per output.
//
// Why not cuBLAS: at m = 1 a GEMM tiles the n outputs into a few dozen tiles (a 2048-wide
// projection is 16 to 32 tiles for 132 SMs), so most of the chip idles while each tile streams its
// share of the weight. Here one warp computes one output column over the whole of `k`, reading its
// weight row 16 bytes a lane at a time, `kUnroll` loads in flight: a 2048-wide projection is 2048
// warps, and every SM streams. `x` is a few KiB and read by every warp: it stays in L1/L2.
//
// Order: lane `l` owns the 16-byte chunks l, l + 32, l + 64, ... of the row and adds their
// products in that order (element by element within a chunk), then the warp sums its lanes with
// a fixed butterfly (`warp_sum`). A row of `y` therefore gets the same bits whatever `m` is (each
// of the `m` rows is summed the same way), and the same bits on every run.
//
// The host checks the shapes, that `k` is a multiple of a chunk's elements, and that `x` and `w`
// start 16-byte aligned (so every chunk is).
//
// SwiGLU epilogue (`kSwiglu`, the `*_swiglu` kernels): for an MLP's stacked gate/up weight, `w` is
// (2n, k), gate rows then up rows, and `y` (m, n) is `silu(gate) * up`. The warp of column `j`
// streams weight rows `j` and `n + j` together, rounds both dot products to T (as the plain kernel
// stores them), and applies `swiglu` of `fused.cu` to the rounded pair with the same expression:
// the same bits as the plain kernel followed by `swiglu`, in one launch and without the (m, 2n)
// intermediate.
//
// QKV epilogue (`gemv_norm_qkv`, `gemv_add_norm_qkv`): for an attention's stacked q/k/v weight
// ((heads + 2 kv_heads) * head_dim, k), the warp of pair `p` streams the two weight rows of one
// RoPE pair (head `p / half`, dims `i` and `i + half`), rounds both products to T, and does what
// `qkv_rope_cache` of `fused.cu` does with them: q rotated into `y` (m, heads * head_dim), k
// rotated and v as is into their cache slots (none for the padding slot or a slot out of range; a
// row whose position is past the rotary tables gets a q of zeros and stores nothing). The same
// bits as `gemv_norm` followed by `qkv_rope_cache`, in one launch.

#include "common.cuh"

namespace {

using sluice::from_f32;
using sluice::kPadSlot;
using sluice::kWarpSize;
using sluice::rotate_first;
using sluice::rotate_second;
using sluice::to_f32;
using sluice::warp_sum;

constexpr int kMaxRows = 8;          // rows of `x` one launch takes; the host checks it
constexpr int kWarpsPerBlock = 4;    // output columns per block
// The launch bounds' minimum of resident blocks at M rows. At one or two rows 4 caps a kernel at 128
// registers, and with that target ptxas issues a group's weight loads before its products
// (`stream_rows`); without it ptxas keeps the registers low by issuing each load just ahead of its
// use, one or two in flight, and a projection with few columns (few warps an SM) waits on memory
// latency (31% of the copy bandwidth at 2048 x 2048, one row, on an H100). More rows need the
// registers for their sums (a cap of 128 spills at 5 to 8 rows in f32).
template <int M> constexpr int kMinBlocksPerSm = M <= 2 ? 4 : 1;

// 16-byte chunks of each weight row a lane loads before it uses any of them: a warp has
// `kUnroll * R` loads of 16 bytes a lane in flight. At one row against one weight row, a projection
// of 2048 to 3072 columns puts only 12 to 23 warps on an SM, so each warp keeps eight in flight
// (with k = 2048 a lane's whole share of its row: one round trip instead of two); with two weight
// rows (the epilogues) four a row already make eight, and more rows of `x` need the registers.
template <int M, int R> constexpr int kUnroll = M * R == 1 ? 8 : 4;

// What a warp does with its column's products.
enum class Epilogue { kStore, kSwiglu, kQkvCache };

// Weight rows a warp streams.
template <Epilogue E> constexpr int kRowsOf = E == Epilogue::kStore ? 1 : 2;

// The QKV epilogue's operands: the rotary tables (max_positions, head_dim / 2), each row's position
// and slot, and the caches (num_slots, kv_heads, head_dim).
template <typename T> struct QkvCache {
    T* k_cache;
    T* v_cache;
    const T* cos;
    const T* sin;
    const uint32_t* positions;
    const uint32_t* slots;
    uint32_t heads;
    uint32_t kv_heads;
    uint32_t head_dim;
    uint32_t max_positions;
    size_t num_slots;
};

// Weight row `j` (of kRowsOf<E>) of column `col`, for `n` columns: the column's own row; its gate
// and up rows (gate/up weight of 2n rows); or the two rows of RoPE pair `col` (q/k/v weight).
template <Epilogue E, typename T>
__device__ __forceinline__ size_t weight_row(uint32_t col, int j, uint32_t n, const QkvCache<T>& qkv) {
    if (E == Epilogue::kSwiglu) {
        return static_cast<size_t>(j) * n + col;
    }
    if (E == Epilogue::kQkvCache) {
        const uint32_t half = qkv.head_dim / 2;
        return static_cast<size_t>(col / half) * qkv.head_dim + col % half + static_cast<size_t>(j) * half;
    }
    return col;
}

// Elements of T in one 16-byte chunk.
template <typename T> struct Chunk { static constexpr int kLen = 16 / static_cast<int>(sizeof(T)); };

// A 16-byte chunk widened to f32.
template <typename T>
__device__ __forceinline__ void widen(const uint4& raw, float* out) {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Chunk<T>::kLen; ++i) {
        out[i] = to_f32(e[i]);
    }
}

// A dot product rounded to T and widened back: the value the plain kernel stores.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
    return to_f32(from_f32<T>(v));
}

// Stores row `m`'s output of column `col` from its products (`a`, and `b` for the two-row
// epilogues), each multiplied by `scale` (gemv_norm's 1 / rms) and rounded to T first, as the
// plain kernel stores them: the product; `silu(gate) * up` (`swiglu` in `fused.cu` has the same
// expression); or the RoPE pair as `qkv_rope_cache` in `fused.cu` treats it.
template <typename T, Epilogue E>
__device__ __forceinline__ void store_output(T* __restrict__ y, uint32_t m, uint32_t col, uint32_t n, float a,
                                             float b, float scale, const QkvCache<T>& qkv) {
    if (E == Epilogue::kStore) {
        y[static_cast<size_t>(m) * n + col] = from_f32<T>(a * scale);
        return;
    }
    const float x1 = rounded<T>(a * scale);
    const float x2 = rounded<T>(b * scale);
    if (E == Epilogue::kSwiglu) {
        y[static_cast<size_t>(m) * n + col] = from_f32<T>(x1 / (1.f + expf(-x1)) * x2);
        return;
    }
    const uint32_t half = qkv.head_dim / 2, head = col / half, i = col % half;
    const uint32_t pos = qkv.positions[m];
    const uint32_t raw_slot = qkv.slots[m];
    const bool in_table = pos < qkv.max_positions;
    const bool store = in_table && raw_slot != kPadSlot && static_cast<size_t>(raw_slot) < qkv.num_slots;
    const size_t slot_row = static_cast<size_t>(raw_slot) * qkv.kv_heads * qkv.head_dim;
    T* dst;
    if (head < qkv.heads) {
        dst = y + (static_cast<size_t>(m) * qkv.heads + head) * qkv.head_dim;
        if (!in_table) {
            dst[i] = from_f32<T>(0.f);
            dst[i + half] = from_f32<T>(0.f);
            return;
        }
    } else if (!store) {
        return;
    } else if (head < qkv.heads + qkv.kv_heads) {
        dst = qkv.k_cache + slot_row + static_cast<size_t>(head - qkv.heads) * qkv.head_dim;
    } else {
        dst = qkv.v_cache + slot_row + static_cast<size_t>(head - qkv.heads - qkv.kv_heads) * qkv.head_dim;
        dst[i] = from_f32<T>(x1);
        dst[i + half] = from_f32<T>(x2);
        return;
    }
    const float cc = to_f32(qkv.cos[static_cast<size_t>(pos) * half + i]);
    const float ss = to_f32(qkv.sin[static_cast<size_t>(pos) * half + i]);
    dst[i] = from_f32<T>(rotate_first(x1, x2, cc, ss));
    dst[i + half] = from_f32<T>(rotate_second(x1, x2, cc, ss));
}

// Adds chunk `c`'s products (weight chunks `wr`, one per weight row the warp streams, against each
// row of `x`) to `acc`, in element order. Each chunk of `x` is read once for all the weight rows.
template <typename T, int M, int R>
__device__ __forceinline__ void accumulate(float (&acc)[R][M], const uint4 (&wr)[R], const uint4* __restrict__ x,
                                           uint32_t chunks, uint32_t c) {
    constexpr int kLen = Chunk<T>::kLen;
    float wv[R][kLen];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        widen<T>(wr[r], wv[r]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float xv[kLen];
        widen<T>(__ldg(x + static_cast<size_t>(m) * chunks + c), xv);
#pragma unroll
        for (int i = 0; i < kLen; ++i) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                acc[r][m] = fmaf(wv[r][i], xv[i], acc[r][m]);
            }
        }
    }
}

// Lane `lane`'s chunks of the `R` weight rows `rows`, in chunk order lane, lane + 32, ...: in whole
// groups of `kUnroll<M, R>` chunks the loads are issued first (streamed: every weight byte is read
// once a step; L1 is kept for `x`), then `use(wr, c)` runs on each chunk in order; the tail one at
// a time. Only when the loads issue depends on the group size, never the order of `use`, so a
// row's bits are the same whatever M is.
template <int M, int R, typename Use>
__device__ __forceinline__ void stream_rows(const uint4* const (&rows)[R], uint32_t chunks, uint32_t lane, Use use) {
    constexpr int kU = kUnroll<M, R>;
    uint32_t c = lane;
    for (; c + (kU - 1) * kWarpSize < chunks; c += kU * kWarpSize) {
        uint4 wr[kU][R];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                wr[u][r] = __ldcs(rows[r] + c + u * kWarpSize);
            }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            use(wr[u], c + u * kWarpSize);
        }
    }
    for (; c < chunks; c += kWarpSize) {
        uint4 wr[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            wr[r] = __ldcs(rows[r] + c);
        }
        use(wr, c);
    }
}

// One warp per output column: grid ceil(n / kWarpsPerBlock), block kWarpsPerBlock * 32. With the
// SwiGLU epilogue the warp streams the column's gate and up rows (`w` is (2n, k)) side by side.
template <typename T, int M, Epilogue E>
__device__ void gemv(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, uint32_t n, uint32_t k) {
    static_assert(E != Epilogue::kQkvCache, "the QKV epilogue runs in gemv_norm");
    constexpr int kRows = kRowsOf<E>;
    const QkvCache<T> none{};
    const uint32_t col = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
    const uint32_t lane = threadIdx.x % kWarpSize;
    if (col >= n) {
        return;
    }
    const uint32_t chunks = k / Chunk<T>::kLen;
    const uint4* rows[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        rows[r] = reinterpret_cast<const uint4*>(w + weight_row<E>(col, r, n, none) * k);
    }
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    float acc[kRows][M];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            acc[r][m] = 0.f;
        }
    }
    stream_rows<M, kRows>(rows, chunks, lane, [&](const uint4(&wr)[kRows], uint32_t c) {
        accumulate<T, M, kRows>(acc, wr, xs, chunks, c);
    });
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            acc[r][m] = warp_sum(acc[r][m]);
        }
    }
    // Every lane holds every sum; lane m stores row m's.
#pragma unroll
    for (int m = 0; m < M; ++m) {
        if (lane == static_cast<uint32_t>(m)) {
            store_output<T, E>(y, m, col, n, acc[0][m], acc[kRows - 1][m], 1.f, none);
        }
    }
}

// gemv_norm: `y = rms_norm(s) · W'ᵀ` with `s = x + r` (or `x`), for the projection that follows an
// RMS norm whose weight was folded into the projection's (`W' = W · diag(norm weight)`, done once at
// load). Each warp reads all of `s`'s row for its dot product anyway, so it also sums the squares
// and scales its dot by `rsqrt(mean(s²) + eps)` at the end: no separate norm launch, no pass over
// the row before the product. `s` is rounded to T before use, as the residual stream stores it,
// and with `r` the warp of column 0 writes it to `sum` (the new residual stream). Same chunk order
// and warp sum as `gemv`, so a row's bits do not depend on `m` either. `n` is the number of
// columns (warps): outputs, gate/up pairs, or RoPE pairs with the QKV epilogue (operands `qkv`).
template <typename T, int M, bool kAdd, Epilogue E>
__device__ void gemv_norm(T* __restrict__ y, T* __restrict__ sum, const T* __restrict__ x, const T* __restrict__ r,
                          const T* __restrict__ w, uint32_t n, uint32_t k, float eps, const QkvCache<T>& qkv) {
    constexpr int kLen = Chunk<T>::kLen;
    constexpr int kRows = kRowsOf<E>;
    const uint32_t col = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
    const uint32_t lane = threadIdx.x % kWarpSize;
    if (col >= n) {
        return;
    }
    const uint32_t chunks = k / kLen;
    const uint4* rows[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
        rows[j] = reinterpret_cast<const uint4*>(w + weight_row<E>(col, j, n, qkv) * k);
    }
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    const uint4* rs = reinterpret_cast<const uint4*>(r);
    uint4* sums = reinterpret_cast<uint4*>(sum);
    float acc[kRows][M], squares[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        squares[m] = 0.f;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            acc[j][m] = 0.f;
        }
    }
    stream_rows<M, kRows>(rows, chunks, lane, [&](const uint4(&wr)[kRows], uint32_t c) {
        float wv[kRows][kLen];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            widen<T>(wr[j], wv[j]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const size_t at = static_cast<size_t>(m) * chunks + c;
            float sv[kLen];
            widen<T>(__ldg(xs + at), sv);
            if (kAdd) {
                float rv[kLen];
                widen<T>(__ldg(rs + at), rv);
                uint4 packed;
                T* out = reinterpret_cast<T*>(&packed);
#pragma unroll
                for (int i = 0; i < kLen; ++i) {
                    out[i] = from_f32<T>(sv[i] + rv[i]);
                    sv[i] = to_f32(out[i]);
                }
                if (col == 0) {
                    sums[at] = packed;
                }
            }
#pragma unroll
            for (int i = 0; i < kLen; ++i) {
#pragma unroll
                for (int j = 0; j < kRows; ++j) {
                    acc[j][m] = fmaf(wv[j][i], sv[i], acc[j][m]);
                }
                squares[m] = fmaf(sv[i], sv[i], squares[m]);
            }
        }
    });
#pragma unroll
    for (int m = 0; m < M; ++m) {
        squares[m] = warp_sum(squares[m]);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            acc[j][m] = warp_sum(acc[j][m]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        if (lane == static_cast<uint32_t>(m)) {
            const float scale = rsqrtf(squares[m] / static_cast<float>(k) + eps);
            store_output<T, E>(y, m, col, n, acc[0][m], acc[kRows - 1][m], scale, qkv);
        }
    }
}

}  // namespace

#define SLUICE_GEMV_NORM_ROWS(T, NAME, M, SUFFIX, E)                                                 \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize, kMinBlocksPerSm<M>)       \
        gemv_norm##SUFFIX##M##_##NAME(T* y, const T* x, const T* w, uint32_t n, uint32_t k, float eps) { \
        gemv_norm<T, M, false, E>(y, nullptr, x, nullptr, w, n, k, eps, QkvCache<T>{});                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize, kMinBlocksPerSm<M>)       \
        gemv_add_norm##SUFFIX##M##_##NAME(T* y, T* sum, const T* x, const T* r, const T* w, uint32_t n, \
                                          uint32_t k, float eps) {                                     \
        gemv_norm<T, M, true, E>(y, sum, x, r, w, n, k, eps, QkvCache<T>{});                           \
    }

// The QKV epilogue's kernels: `n` is the number of RoPE pairs, (heads + 2 kv_heads) * head_dim / 2.
#define SLUICE_GEMV_NORM_QKV_ROWS(T, NAME, M)                                                          \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize, kMinBlocksPerSm<M>)       \
        gemv_norm_qkv##M##_##NAME(                                                                     \
        T* q, T* k_cache, T* v_cache, const T* x, const T* w, const T* cos, const T* sin,              \
        const uint32_t* positions, const uint32_t* slots, uint32_t n, uint32_t k, float eps,           \
        uint32_t heads, uint32_t kv_heads, uint32_t head_dim, uint32_t max_positions, size_t num_slots) { \
        const QkvCache<T> qkv{k_cache, v_cache, cos, sin, positions, slots,                             \
                              heads, kv_heads, head_dim, max_positions, num_slots};                    \
        gemv_norm<T, M, false, Epilogue::kQkvCache>(q, nullptr, x, nullptr, w, n, k, eps, qkv);        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize, kMinBlocksPerSm<M>)       \
        gemv_add_norm_qkv##M##_##NAME(                                                                 \
        T* q, T* sum, T* k_cache, T* v_cache, const T* x, const T* r, const T* w, const T* cos,        \
        const T* sin, const uint32_t* positions, const uint32_t* slots, uint32_t n, uint32_t k,        \
        float eps, uint32_t heads, uint32_t kv_heads, uint32_t head_dim, uint32_t max_positions,       \
        size_t num_slots) {                                                                            \
        const QkvCache<T> qkv{k_cache, v_cache, cos, sin, positions, slots,                             \
                              heads, kv_heads, head_dim, max_positions, num_slots};                    \
        gemv_norm<T, M, true, Epilogue::kQkvCache>(q, sum, x, r, w, n, k, eps, qkv);                   \
    }

#define SLUICE_GEMV_ROWS(T, NAME, M)                                                                   \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize, kMinBlocksPerSm<M>)       \
        gemv##M##_##NAME(T* y, const T* x, const T* w, uint32_t n, uint32_t k) {                       \
        gemv<T, M, Epilogue::kStore>(y, x, w, n, k);                                                   \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize, kMinBlocksPerSm<M>)       \
        gemv_swiglu##M##_##NAME(T* y, const T* x, const T* w, uint32_t n, uint32_t k) {                \
        gemv<T, M, Epilogue::kSwiglu>(y, x, w, n, k);                                                  \
    }

#define SLUICE_GEMV(T, NAME)                                                                           \
    SLUICE_GEMV_ROWS(T, NAME, 1)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 2)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 3)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 4)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 5)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 6)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 7)                                                                       \
    SLUICE_GEMV_ROWS(T, NAME, 8)

static_assert(kMaxRows == 8, "one SLUICE_GEMV_ROWS per row count");

// gemv_norm takes at most kMaxNormRows rows: each warp rounds and squares all of `s`, which at more
// rows costs more arithmetic than the weight's bytes take to stream.
constexpr int kMaxNormRows = 2;
#define SLUICE_GEMV_NORM(T, NAME)                                                                      \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 1, , Epilogue::kStore)                                              \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 2, , Epilogue::kStore)                                              \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 1, _swiglu, Epilogue::kSwiglu)                                      \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 2, _swiglu, Epilogue::kSwiglu)                                      \
    SLUICE_GEMV_NORM_QKV_ROWS(T, NAME, 1)                                                              \
    SLUICE_GEMV_NORM_QKV_ROWS(T, NAME, 2)
static_assert(kMaxNormRows == 2, "one SLUICE_GEMV_NORM_ROWS per row count");

SLUICE_GEMV_NORM(float, f32)
SLUICE_GEMV_NORM(__half, f16)
SLUICE_GEMV_NORM(__nv_bfloat16, bf16)

SLUICE_GEMV(float, f32)
SLUICE_GEMV(__half, f16)
SLUICE_GEMV(__nv_bfloat16, bf16)
