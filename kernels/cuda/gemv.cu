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

#include "common.cuh"

namespace {

using sluice::from_f32;
using sluice::kWarpSize;
using sluice::to_f32;
using sluice::warp_sum;

constexpr int kMaxRows = 8;          // rows of `x` one launch takes; the host checks it
constexpr int kWarpsPerBlock = 4;    // output columns per block
constexpr int kUnroll = 4;           // 16-byte weight loads a lane has in flight

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

// The output of a column: its dot product (`acc[0]`) or, with the SwiGLU epilogue, `silu(gate) * up`
// of its gate and up products (`acc[0]`, `acc[1]`), each rounded to T first; `scale` multiplies each
// product before rounding (gemv_norm's 1 / rms). `swiglu` in `fused.cu` has the same expression.
template <typename T, bool kSwiglu>
__device__ __forceinline__ T column_output(float gate, float up, float scale) {
    if (!kSwiglu) {
        return from_f32<T>(gate * scale);
    }
    const float g = rounded<T>(gate * scale);
    const float u = rounded<T>(up * scale);
    return from_f32<T>(g / (1.f + expf(-g)) * u);
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

// One warp per output column: grid ceil(n / kWarpsPerBlock), block kWarpsPerBlock * 32. With
// kSwiglu the warp streams the column's gate and up rows (`w` is (2n, k)) side by side.
template <typename T, int M, bool kSwiglu>
__device__ void gemv(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, uint32_t n, uint32_t k) {
    constexpr int kRows = kSwiglu ? 2 : 1;
    const uint32_t col = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
    const uint32_t lane = threadIdx.x % kWarpSize;
    if (col >= n) {
        return;
    }
    const uint32_t chunks = k / Chunk<T>::kLen;
    const uint4* rows[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        rows[r] = reinterpret_cast<const uint4*>(w + (static_cast<size_t>(r) * n + col) * k);
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
    uint32_t c = lane;
    // Whole groups of kUnroll chunks: the loads first, then the products, in chunk order.
    for (; c + (kUnroll - 1) * kWarpSize < chunks; c += kUnroll * kWarpSize) {
        uint4 wr[kUnroll][kRows];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                // Streamed: every weight byte is read once a step; keep L1 for `x`.
                wr[u][r] = __ldcs(rows[r] + c + u * kWarpSize);
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            accumulate<T, M, kRows>(acc, wr[u], xs, chunks, c + u * kWarpSize);
        }
    }
    for (; c < chunks; c += kWarpSize) {
        uint4 wr[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            wr[r] = __ldcs(rows[r] + c);
        }
        accumulate<T, M, kRows>(acc, wr, xs, chunks, c);
    }
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
            y[static_cast<size_t>(m) * n + col] = column_output<T, kSwiglu>(acc[0][m], acc[kRows - 1][m], 1.f);
        }
    }
}

// gemv_norm: `y = rms_norm(s) · W'ᵀ` with `s = x + r` (or `x`), for the projection that follows an
// RMS norm whose weight was folded into the projection's (`W' = W · diag(norm weight)`, done once at
// load). Each warp reads all of `s`'s row for its dot product anyway, so it also sums the squares
// and scales its dot by `rsqrt(mean(s²) + eps)` at the end: no separate norm launch, no pass over
// the row before the product. `s` is rounded to T before use, as the residual stream stores it,
// and with `r` the warp of column 0 writes it to `sum` (the new residual stream). Same chunk order
// and warp sum as `gemv`, so a row's bits do not depend on `m` either; kSwiglu as there.
template <typename T, int M, bool kAdd, bool kSwiglu>
__device__ void gemv_norm(T* __restrict__ y, T* __restrict__ sum, const T* __restrict__ x, const T* __restrict__ r,
                          const T* __restrict__ w, uint32_t n, uint32_t k, float eps) {
    constexpr int kLen = Chunk<T>::kLen;
    constexpr int kRows = kSwiglu ? 2 : 1;
    const uint32_t col = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
    const uint32_t lane = threadIdx.x % kWarpSize;
    if (col >= n) {
        return;
    }
    const uint32_t chunks = k / kLen;
    const uint4* rows[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
        rows[j] = reinterpret_cast<const uint4*>(w + (static_cast<size_t>(j) * n + col) * k);
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
#pragma unroll 4
    for (uint32_t c = lane; c < chunks; c += kWarpSize) {
        float wv[kRows][kLen];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            widen<T>(__ldcs(rows[j] + c), wv[j]);
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
    }
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
            y[static_cast<size_t>(m) * n + col] = column_output<T, kSwiglu>(acc[0][m], acc[kRows - 1][m], scale);
        }
    }
}

}  // namespace

#define SLUICE_GEMV_NORM_ROWS(T, NAME, M, SUFFIX, SWIGLU)                                            \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)                           \
        gemv_norm##SUFFIX##M##_##NAME(T* y, const T* x, const T* w, uint32_t n, uint32_t k, float eps) { \
        gemv_norm<T, M, false, SWIGLU>(y, nullptr, x, nullptr, w, n, k, eps);                          \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)                           \
        gemv_add_norm##SUFFIX##M##_##NAME(T* y, T* sum, const T* x, const T* r, const T* w, uint32_t n, \
                                          uint32_t k, float eps) {                                     \
        gemv_norm<T, M, true, SWIGLU>(y, sum, x, r, w, n, k, eps);                                     \
    }

#define SLUICE_GEMV_ROWS(T, NAME, M)                                                                   \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)                           \
        gemv##M##_##NAME(T* y, const T* x, const T* w, uint32_t n, uint32_t k) {                       \
        gemv<T, M, false>(y, x, w, n, k);                                                              \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)                           \
        gemv_swiglu##M##_##NAME(T* y, const T* x, const T* w, uint32_t n, uint32_t k) {                \
        gemv<T, M, true>(y, x, w, n, k);                                                               \
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
    SLUICE_GEMV_NORM_ROWS(T, NAME, 1, , false)                                                         \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 2, , false)                                                         \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 1, _swiglu, true)                                                   \
    SLUICE_GEMV_NORM_ROWS(T, NAME, 2, _swiglu, true)
static_assert(kMaxNormRows == 2, "one SLUICE_GEMV_NORM_ROWS per row count");

SLUICE_GEMV_NORM(float, f32)
SLUICE_GEMV_NORM(__half, f16)
SLUICE_GEMV_NORM(__nv_bfloat16, bf16)

SLUICE_GEMV(float, f32)
SLUICE_GEMV(__half, f16)
SLUICE_GEMV(__nv_bfloat16, bf16)
