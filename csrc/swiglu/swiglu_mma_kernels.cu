// Tensor-core forward and backward pass 1 of the fused expert SwiGLU and combine for bfloat16
// (docs/design.md, "Fused expert SwiGLU"; bench/NOTES.md v3 has the why and the numbers).
//
// The CUDA-core kernel (swiglu_kernels.cu) spends ~11 instructions per (pair, column) on the
// rank-r products. Here they are warp MMAs (mma.sync m16n8k16, bf16 in, fp32 accumulate):
//   delta_g[pairs, cols] = Zg_masked [pairs, E x Rg] @ Bg^T  (Zg_masked: pair q's zg in the
//   delta_u likewise with Zu_masked and Bu                    columns of its expert, else 0)
//   zd_all[pairs, E x Rd] = drop(h) [pairs, cols] @ Ad^T      (pair q keeps its expert's Rd)
// (g = G + s * delta_g, u = U + s * delta_u.)
// The block's pairs are ordered by expert (a counting sort in shared memory), so each warp's
// 16 rows span few experts, and a warp skips the experts none of its rows uses. z and h are
// fp32: z is split into bf16 hi + lo (16 bits; enough for g and u, which are rounded to bf16
// in hbar), h into hi + mid + lo (24 bits, as fp32; zd is an fp32 output), and every term
// goes through the MMA (the weights are bf16, exact in it).
//
// Block: 8 warps, 128 pair rows (kMmaRows / k whole tokens), mma_block_cols columns taken
// kMmaStep at a time; warp w owns sorted rows 16w .. 16w + 15. Each step's weight tiles (Bg, Bu,
// Ad of every expert on the step's columns) and G / U tiles are copied to shared memory with
// cp.async one step ahead (two stages). Per step each warp computes its delta_g, delta_u tile
// in MMA accumulators, g, u, h in the accumulator layout (which is also the A layout of the zd MMA, so
// h never leaves registers), w * h to shared memory for the combine over j (in j order, by the
// whole block), and adds its zd MMA results to per-thread accumulators (each (pair, rank) owned
// by one thread). zd's per-tile sums go to zd_tiles, added in tile order by the caller. Fixed
// MMA and summation order: bitwise deterministic.
//
// The backward's first pass has the same blocks and steps. It recomputes the LoRA deltas of g
// and u as above, adds ad_gz = grad_zd_masked [pairs, E x Rd] @ Ad (grad_zd in three terms), and
// takes the per-pair sums dzg / s = dg [pairs, cols] @ Bg and dzu / s = du @ Bu as MMAs of the
// gradients in the accumulator layout (three terms each). dG and dU go through shared memory
// for the combine over j; dweights is summed by each thread over its columns, then over its
// quad. The weight gradients (pass 2, expert-major) stay in swiglu_kernels.cu.
#include <algorithm>
#include <cassert>

#include "swiglu/swiglu_kernels.cuh"
#include "swiglu/swiglu_math.h"

namespace mixlora {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * kWarpSize;
constexpr int kMmaRows = 16 * kMmaWarps;  // pair rows of a block
constexpr int kMmaStep = 16;              // columns per step: 2 n-tiles of 8, one k-chunk of 16
constexpr int kMmaBlockCols = 512;        // columns per block at most (one partial of the sums each)
constexpr int kMmaMinBlocks = 264;        // blocks the column width is cut down to reach (few tokens)
// Pairs below which the CUDA-core kernels are taken: with so few rows per block the masked MMAs,
// the staging and the per-tile partials cost more than they save (H100, T = 8: 0.040 ms against
// 0.015 ms for the forward, bench/NOTES.md).
constexpr int64_t kMmaMinPairs = 8 * kMmaRows;
constexpr int kPad = 8;                   // bf16 padding of staged rows: conflict-free fragments
constexpr int kColStride = kMmaStep + kPad;  // staged [.., step columns] row stride (bf16)
constexpr int kWhStride = kMmaStep + 8;      // w * h row stride (floats): conflict-free float2
constexpr int kMmaMaxRank = 64;
constexpr int kMmaMaxExperts = 64;
constexpr size_t kMmaMaxSmem = 110 * 1024;  // 2 blocks per SM fit (with the static part)

// (a, b) = hi + lo with hi, lo bf16 pairs: hi the rounded values, lo the rounded remainders.
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  hi = pack_bf16x2(h);
  lo = pack_bf16x2(__floats2bfloat162_rn(a - hf.x, b - hf.y));
}

// OR over the warp (a fixed butterfly).
__device__ __forceinline__ unsigned warp_or(unsigned v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v |= __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The h-side split: (a, b) = hi + mid + lo, three bf16 pairs (24 bits: fp32's precision).
__device__ __forceinline__ void split3_bf16x2(float a, float b, uint32_t& hi, uint32_t& mid,
                                              uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  split_bf16x2(a - hf.x, b - hf.y, mid, lo);
  hi = pack_bf16x2(h);
}

// Shared-memory layout of a block (every offset 16-byte aligned): fp32 row buffers
// [kMmaRows, kWhStride] (the forward's w * h; the backward's dg and du), z (gate and up) split
// into hi / lo words by sorted row, in the backward grad_zd split into hi / mid / lo words, and
// two stages, each holding a step's Bg [E, kMmaStep, Rg + kPad], Bu [E, kMmaStep, Ru + kPad],
// Ad [E, Rd, kColStride] and G, U (and in the backward grad_hbar) [tokens, kColStride] (bf16).
struct MmaSmem {
  int64_t rows, z, gz, stage, stage_bytes;  // byte offsets / sizes
  int64_t bg, bu, ad, g, u, gh;             // element offsets inside a stage
  int64_t total;

  __host__ __device__ MmaSmem(int64_t E, int64_t Rg, int64_t Ru, int64_t Rd, int64_t tokens,
                              bool backward) {
    rows = 0;
    z = rows + int64_t(sizeof(float)) * kMmaRows * kWhStride * (backward ? 2 : 1);
    gz = z + int64_t(sizeof(uint32_t)) * kMmaRows * (Rg + Ru);  // hi + lo: R words per row
    stage = gz + (backward ? int64_t(sizeof(uint32_t)) * kMmaRows * 3 * (Rd / 2) : 0);
    bg = 0;
    bu = bg + E * kMmaStep * (Rg > 0 ? Rg + kPad : 0);
    ad = bu + E * kMmaStep * (Ru > 0 ? Ru + kPad : 0);
    g = ad + E * Rd * kColStride;
    u = g + tokens * kColStride;
    gh = u + tokens * kColStride;
    stage_bytes = int64_t(sizeof(bf16)) * (gh + (backward ? tokens * kColStride : 0));
    total = stage + 2 * stage_bytes;
  }
};

// A warp's view of its 16 MMA rows. The block's pairs are ordered by expert, so a warp's rows
// span few experts and the masked MMAs skip the rest.
struct WarpRows {
  int row[2];     // this thread's fragment rows: 16 w + lane / 4, and + 8
  int pair[2];    // the block pair at that row, -1 past the block's pairs
  int expert[2];  // its expert, -1 past the block's pairs
  uint64_t used;  // bit e: some row of the warp belongs to expert e
};

// acc[nt] += (Z_masked @ B^T) for the step's n-tiles: over the experts e the warp uses, the
// rows of expert e times the staged B[e, step columns, :]^T. z is split into bf16 hi / lo
// pairs by sorted row ([kMmaRows, R / 2] words each).
__device__ __forceinline__ void lora_update(const WarpRows& w, const uint32_t* z_hi,
                                            const uint32_t* z_lo, const bf16* B_s, int R,
                                            float (&acc)[kMmaStep / 8][4]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  const int row_words = R / 2, col_stride = R + kPad;
  for (uint64_t left = w.used; left != 0; left &= left - 1) {
    const int e = __ffsll(static_cast<long long>(left)) - 1;
    const bf16* B_e = B_s + (e * kMmaStep + g) * col_stride;  // staged B[e, step column g, :]
    for (int k0 = 0; k0 < R; k0 += 16) {
      const int ka = k0 + 2 * c, kb = ka + 8;  // this thread's k (rank) pairs
      uint32_t a_hi[4], a_lo[4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // A regs: (row0, ka) (row1, ka) (row0, kb) (row1, kb)
        const bool mine = w.expert[half] == e;
        const int base = w.row[half] * row_words;
        a_hi[half] = mine && ka < R ? z_hi[base + ka / 2] : 0u;
        a_lo[half] = mine && ka < R ? z_lo[base + ka / 2] : 0u;
        a_hi[2 + half] = mine && kb < R ? z_hi[base + kb / 2] : 0u;
        a_lo[2 + half] = mine && kb < R ? z_lo[base + kb / 2] : 0u;
      }
#pragma unroll
      for (int nt = 0; nt < kMmaStep / 8; ++nt) {
        const bf16* Bp = B_e + nt * 8 * col_stride;
        const uint32_t b0 = ka < R ? *reinterpret_cast<const uint32_t*>(Bp + ka) : 0u;
        const uint32_t b1 = kb < R ? *reinterpret_cast<const uint32_t*>(Bp + kb) : 0u;
        mma_bf16(acc[nt], a_hi, b0, b1);
        mma_bf16(acc[nt], a_lo, b0, b1);
      }
    }
  }
}

// Two bf16 of a staged tile, at p and p + stride, as one B-operand register (p's in the low half).
__device__ __forceinline__ uint32_t gather_pair(const bf16* p, int stride) {
  const uint32_t lo = *reinterpret_cast<const uint16_t*>(p);
  const uint32_t hi = *reinterpret_cast<const uint16_t*>(p + stride);
  return lo | (hi << 16);
}

// The per-pair sums over the step's columns of A_cols [rows, 16 step columns] (three split
// terms, in the accumulator = A layout) times a staged weight: for each expert e the warp uses
// and each n-tile rb of 8 of its R ranks, sum_col A[row, col] * W(e, r, col), added into
// acc[half][rb][v] (rank 8 rb + 2 c + v) where the row belongs to e. W(e, r, col) is at
// W_s[e * e_stride + r * r_stride + col * col_stride].
template <int R8>
__device__ __forceinline__ void pair_sums(const WarpRows& w, const uint32_t (&a_hi)[4],
                                          const uint32_t (&a_mid)[4], const uint32_t (&a_lo)[4],
                                          const bf16* W_s, int R, int e_stride, int r_stride,
                                          int col_stride, float (&acc)[2][R8][2]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, c = lane % 4;
  for (uint64_t left = w.used; left != 0; left &= left - 1) {
    const int e = __ffsll(static_cast<long long>(left)) - 1;
#pragma unroll
    for (int rb = 0; rb < R8; ++rb) {
      if (rb * 8 >= R) break;
      const int r = rb * 8 + g;  // this thread's B column (n): a rank
      const bf16* W_r = W_s + e * e_stride + r * r_stride + 2 * c * col_stride;  // k = 2 c
      const bool rank_ok = r < R;
      uint32_t b0 = 0u, b1 = 0u;
      if (rank_ok) {
        b0 = col_stride == 1 ? *reinterpret_cast<const uint32_t*>(W_r) : gather_pair(W_r, col_stride);
        b1 = col_stride == 1 ? *reinterpret_cast<const uint32_t*>(W_r + 8)
                             : gather_pair(W_r + 8 * col_stride, col_stride);
      }
      float cz[4] = {0.f, 0.f, 0.f, 0.f};
      mma_bf16(cz, a_hi, b0, b1);
      mma_bf16(cz, a_mid, b0, b1);
      mma_bf16(cz, a_lo, b0, b1);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (w.expert[half] == e) {
          acc[half][rb][0] += cz[2 * half];
          acc[half][rb][1] += cz[2 * half + 1];
        }
      }
    }
  }
}

// Issues the cp.async copies of step c0's tiles into one stage (columns past col_end, zeros).
// Thread i copies chunk i % C of rows i / C, i / C + kMmaThreads / C, ... of each tile, C its
// 16-byte chunks per row (a power of two dividing kMmaThreads): no division per step.
// grad_hbar: null in the forward.
__device__ __forceinline__ void stage_step(const SwigluInputs& p, const bf16* grad_hbar,
                                           const MmaSmem& L, bf16* st, int64_t t0, int tokens,
                                           int64_t c0, int64_t col_end) {
  constexpr int kChunks = kMmaStep / 8;  // 16-byte chunks of a step row of G, U, Ad
  const int E = static_cast<int>(p.E);
  for (int pass = 0; pass < 2; ++pass) {  // Bg, Bu: rows (e, step column) of R ranks, from [E, I, R]
    const bf16* B = static_cast<const bf16*>(pass == 0 ? p.Bg : p.Bu);
    const int R = static_cast<int>(pass == 0 ? p.Rg : p.Ru);
    if (B == nullptr) continue;
    bf16* dst = st + (pass == 0 ? L.bg : L.bu);
    const int per_row = R / 8, chunk = threadIdx.x % per_row;
    for (int row = threadIdx.x / per_row; row < E * kMmaStep; row += kMmaThreads / per_row) {
      const int e = row / kMmaStep, col = row % kMmaStep;
      const bool valid = c0 + col < col_end;
      const bf16* src = B + (int64_t(e) * p.I + (valid ? c0 + col : 0)) * R + chunk * 8;
      cp_async16_zfill(dst + row * (R + kPad) + chunk * 8, src, valid);
    }
  }
  const int chunk = threadIdx.x % kChunks;
  const bool chunk_valid = c0 + chunk * 8 < col_end;
  const int64_t col = chunk_valid ? c0 + chunk * 8 : 0;
  if (p.Ad != nullptr) {  // Ad: rows (e, r) of the step's columns, from [E, Rd, I]
    const bf16* Ad = static_cast<const bf16*>(p.Ad) + col;
    for (int row = threadIdx.x / kChunks; row < E * p.Rd; row += kMmaThreads / kChunks) {
      cp_async16_zfill(st + L.ad + row * kColStride + chunk * 8, Ad + int64_t(row) * p.I, chunk_valid);
    }
  }
  const bf16* srcs[3] = {static_cast<const bf16*>(p.G), static_cast<const bf16*>(p.U), grad_hbar};
  const int64_t dsts[3] = {L.g, L.u, L.gh};
  const int tiles = grad_hbar != nullptr ? 3 : 2;  // G rows, U rows (, grad_hbar rows)
  for (int row = threadIdx.x / kChunks; row < tiles * tokens; row += kMmaThreads / kChunks) {
    const int which = row / tokens, t = row % tokens;
    cp_async16_zfill(st + dsts[which] + t * kColStride + chunk * 8,
                     srcs[which] + (t0 + t) * p.I + col, chunk_valid);
  }
}

// What both kernels set up once per block: the pairs' experts and weights, their counting sort
// by expert into rows, z of the gate and up LoRAs split into hi / lo words by row, and the
// thread's WarpRows.
struct BlockRows {
  int64_t t0, q0;
  int tokens, rows;
  WarpRows w;
  int tok[2];            // the fragment row's token in the block
  int64_t drop_base[2];  // its dropout index base q * I
  float weight[2];       // its routing weight
};

__device__ __forceinline__ BlockRows setup_block(const SwigluInputs& p, int64_t tokens_per_block,
                                                 int32_t* ids_s, float* weights_s, int32_t* perm_s,
                                                 uint32_t* zg_hi, uint32_t* zg_lo, uint32_t* zu_hi,
                                                 uint32_t* zu_lo) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4;
  const int k = static_cast<int>(p.k);
  BlockRows b;
  b.t0 = int64_t(blockIdx.x) * tokens_per_block;
  b.tokens = static_cast<int>(min(tokens_per_block, p.T - b.t0));
  b.rows = b.tokens * k;
  b.q0 = b.t0 * p.k;
  const float* weights = static_cast<const float*>(p.weights);
  for (int r = threadIdx.x; r < kMmaRows; r += kMmaThreads) {
    ids_s[r] = r < b.rows ? p.ids[b.q0 + r] : -1;
    weights_s[r] = r < b.rows ? weights[b.q0 + r] : 0.f;
  }
  __syncthreads();
  // Stable counting sort of the block's pairs by expert: pair r goes to row
  // #{i : e_i < e_r} + #{i < r : e_i == e_r}.
  for (int r = threadIdx.x; r < kMmaRows; r += kMmaThreads) {
    if (r < b.rows) {
      const int e = ids_s[r];
      int pos = 0;
      for (int i = 0; i < b.rows; ++i) {
        const int ei = ids_s[i];
        pos += (ei < e) || (ei == e && i < r);
      }
      perm_s[pos] = r;
    } else {
      perm_s[r] = -1;
    }
  }
  __syncthreads();
  for (int pass = 0; pass < 2; ++pass) {  // zg, zu split into hi / lo by sorted row
    const float* z = static_cast<const float*>(pass == 0 ? p.zg : p.zu);
    const int R = static_cast<int>(pass == 0 ? p.Rg : p.Ru);
    if ((pass == 0 ? p.Bg : p.Bu) == nullptr) continue;
    uint32_t* hi = pass == 0 ? zg_hi : zu_hi;
    uint32_t* lo = pass == 0 ? zg_lo : zu_lo;
    for (int i = threadIdx.x; i < b.rows * (R / 2); i += kMmaThreads) {
      const int row = i / (R / 2), kp = i % (R / 2);
      const float* src = z + (b.q0 + perm_s[row]) * R + 2 * kp;
      split_bf16x2(src[0], src[1], hi[i], lo[i]);
    }
  }

  unsigned used_lo = 0, used_hi = 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    b.w.row[half] = warp * 16 + g + 8 * half;
    b.w.pair[half] = perm_s[b.w.row[half]];
    const int pair = max(b.w.pair[half], 0);  // (rows past the pairs compute nothing)
    const int e = b.w.pair[half] >= 0 ? ids_s[pair] : -1;
    assert(e < p.E);
    b.w.expert[half] = e;
    if (e >= 0 && e < 32) used_lo |= 1u << e;
    if (e >= 32) used_hi |= 1u << (e - 32);
    b.tok[half] = pair / k;
    b.drop_base[half] = (b.q0 + pair) * p.I;
    b.weight[half] = weights_s[pair];
  }
  b.w.used = (uint64_t(warp_or(used_hi)) << 32) | warp_or(used_lo);
  return b;
}

// out[t, step columns] = sum_j rows_buf[t k + j] over the block's tokens, j ascending, stored
// in bf16; 8 columns per task.
__device__ __forceinline__ void combine_pairs(const float* rows_buf, bf16* out, int64_t I, int64_t t0,
                                              int tokens, int k, int64_t c0, int64_t col_end) {
  for (int task = threadIdx.x; task < tokens * (kMmaStep / 8); task += kMmaThreads) {
    const int t = task / (kMmaStep / 8), cg = (task % (kMmaStep / 8)) * 8;
    if (c0 + cg >= col_end) continue;
    float sum[8] = {};
    for (int j = 0; j < k; ++j) {
      const float* src = rows_buf + (t * k + j) * kWhStride + cg;
#pragma unroll
      for (int v = 0; v < 8; ++v) sum[v] += src[v];
    }
    store_acc<8>(out + (t0 + t) * I + c0 + cg, sum);
  }
}

// RD8: rank blocks of 8 of Ad a thread accumulates zd for (Rd <= 8 * RD8).
template <int RD8>
__global__ void __launch_bounds__(kMmaThreads)
    moe_swiglu_mma_kernel(MoeSwigluParams p, int64_t tokens_per_block, int64_t block_cols,
                          float* zd_tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int32_t ids_s[kMmaRows];      // by block pair
  __shared__ float weights_s[kMmaRows];    // by block pair
  __shared__ int32_t perm_s[kMmaRows];     // sorted row -> block pair (-1 past the pairs)
  const int lane = threadIdx.x % kWarpSize, c = lane % 4;
  const MmaSmem L(p.E, p.Rg, p.Ru, p.Rd, tokens_per_block, false);
  float* wh = reinterpret_cast<float*>(smem + L.rows);  // [kMmaRows, kWhStride]: w * h, by pair
  uint32_t* zg_hi = reinterpret_cast<uint32_t*>(smem + L.z);  // [kMmaRows, Rg / 2] (sorted rows)
  uint32_t* zg_lo = zg_hi + kMmaRows * (p.Rg / 2);
  uint32_t* zu_hi = zg_lo + kMmaRows * (p.Rg / 2);            // [kMmaRows, Ru / 2]
  uint32_t* zu_lo = zu_hi + kMmaRows * (p.Ru / 2);
  bf16* stages[2] = {reinterpret_cast<bf16*>(smem + L.stage),
                     reinterpret_cast<bf16*>(smem + L.stage + L.stage_bytes)};
  const int64_t t0 = int64_t(blockIdx.x) * tokens_per_block;
  const int tokens = static_cast<int>(min(tokens_per_block, p.T - t0));
  const int64_t col_begin = int64_t(blockIdx.y) * block_cols;
  const int64_t col_end = min(p.I, col_begin + block_cols);
  stage_step(p, nullptr, L, stages[0], t0, tokens, col_begin, col_end);  // flies meanwhile
  cp_async_commit();
  const BlockRows b = setup_block(p, tokens_per_block, ids_s, weights_s, perm_s, zg_hi, zg_lo,
                                  zu_hi, zu_lo);
  const WarpRows& w = b.w;

  const float s = static_cast<float>(p.scale);
  const DropoutScale<float> drop(p.dropout_p, p.key);
  float zacc[2][RD8][2] = {};  // zd[pair[half], 8 rb + 2 c + v] over this block's columns
  int st = 0;
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kMmaStep, st ^= 1) {
    if (c0 + kMmaStep < col_end) stage_step(p, nullptr, L, stages[st ^ 1], t0, tokens, c0 + kMmaStep, col_end);
    cp_async_commit();
    cp_async_wait<1>();  // this step's tiles have landed (the next step's may fly)
    __syncthreads();     // ... for every thread; and the block setup is visible
    const bf16* S = stages[st];

    float dgl[kMmaStep / 8][4] = {}, dul[kMmaStep / 8][4] = {};  // delta_g, delta_u
    if (p.Bg != nullptr) lora_update(w, zg_hi, zg_lo, S + L.bg, static_cast<int>(p.Rg), dgl);
    if (p.Bu != nullptr) lora_update(w, zu_hi, zu_lo, S + L.bu, static_cast<int>(p.Ru), dul);

    // g, u, h at the accumulator positions (rows row[half], step columns 8 nt + 2 c + v);
    // drop(h) straight into the zd MMA's A fragment (regs: (row0, k) (row1, k) (row0, k + 8)
    // (row1, k + 8), k = 2 c: n-tile 0 is k 0..7, n-tile 1 is k 8..15).
    uint32_t h_hi[4], h_mid[4], h_lo[4];
#pragma unroll
    for (int nt = 0; nt < kMmaStep / 8; ++nt) {
      const int col = nt * 8 + 2 * c;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float h[2] = {0.f, 0.f}, hd[2] = {0.f, 0.f};
        if (w.pair[half] >= 0 && c0 + col < col_end) {  // I % 8 == 0: col + 1 is inside too
          const int at = b.tok[half] * kColStride + col;
          const float2 Gv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.g + at));
          const float2 Uv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.u + at));
          const float Gs[2] = {Gv.x, Gv.y}, Us[2] = {Uv.x, Uv.y};
#pragma unroll
          for (int v = 0; v < 2; ++v) {
            const float gv = p.Bg != nullptr ? Gs[v] + s * dgl[nt][2 * half + v] : Gs[v];
            const float uv = p.Bu != nullptr ? Us[v] + s * dul[nt][2 * half + v] : Us[v];
            h[v] = swiglu_point<float, float>(p.activation, s, gv, uv, nullptr, nullptr, 0, nullptr,
                                              nullptr, 0).h;
            hd[v] = drop.active ? drop.factor(b.drop_base[half] + c0 + col + v) * h[v] : h[v];
          }
          *reinterpret_cast<float2*>(wh + w.pair[half] * kWhStride + col) =
              make_float2(b.weight[half] * h[0], b.weight[half] * h[1]);
        }
        split3_bf16x2(hd[0], hd[1], h_hi[nt * 2 + half], h_mid[nt * 2 + half], h_lo[nt * 2 + half]);
      }
    }
    // zd: Ad [E, Rd, step columns] staged, ranks by r_stride kColStride, columns contiguous.
    if (p.Ad != nullptr) {
      pair_sums<RD8>(w, h_hi, h_mid, h_lo, S + L.ad, static_cast<int>(p.Rd),
                     static_cast<int>(p.Rd) * kColStride, kColStride, 1, zacc);
    }

    __syncthreads();  // wh is complete (and this stage is no longer read: the next copy may reuse it)
    combine_pairs(wh, static_cast<bf16*>(p.hbar), p.I, t0, tokens, static_cast<int>(p.k), c0, col_end);
    // (the next step's first barrier orders these reads of wh before its writes)
  }

  if (p.Ad != nullptr) {
    const int64_t N = p.T * p.k;
    float* dst = zd_tiles + int64_t(blockIdx.y) * N * p.Rd;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (w.pair[half] < 0) continue;
      const int64_t q = b.q0 + w.pair[half];
#pragma unroll
      for (int rb = 0; rb < RD8; ++rb) {
#pragma unroll
        for (int v = 0; v < 2; ++v) {
          const int r = rb * 8 + 2 * c + v;
          if (r < p.Rd) dst[q * p.Rd + r] = zacc[half][rb][v];
        }
      }
    }
  }
}

// Backward pass 1 (dG, dU, dweights, dzg, dzu) on tensor cores, laid out as the forward:
// per step the recompute of g, u (MMAs as in the forward), ad_gz = (grad_zd_masked @ Ad)
// [rows, step columns] (grad_zd split into three bf16 terms), dh, dg, du in the accumulator
// layout, dG and dU through shared memory for the combine over j, and the per-pair sums over
// the block's columns: dweights (each thread its own, then its quad in a fixed butterfly) and
// dzg / s, dzu / s (MMAs of dg, du, split into three terms, with the staged Bg, Bu). The sums
// go to sums: [num_tiles, N, 1 + Rg + Ru] partials, or with one column tile straight to the
// outputs (scaled). R8: rank blocks of 8 per thread for dzg and dzu (Rg, Ru <= 8 * R8).
template <int R8>
__global__ void __launch_bounds__(kMmaThreads)
    moe_swiglu_bwd_mma_kernel(MoeSwigluBackwardParams p, int64_t tokens_per_block,
                              int64_t block_cols, float* sums, int64_t num_tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int32_t ids_s[kMmaRows];
  __shared__ float weights_s[kMmaRows];
  __shared__ int32_t perm_s[kMmaRows];
  const int lane = threadIdx.x % kWarpSize, c = lane % 4;
  const bool has_gzd = p.grad_zd != nullptr && p.Ad != nullptr;
  const int Rd = has_gzd ? static_cast<int>(p.Rd) : 0;
  const MmaSmem L(p.E, p.Rg, p.Ru, p.Rd, tokens_per_block, true);
  float* dg_buf = reinterpret_cast<float*>(smem + L.rows);  // [kMmaRows, kWhStride], by pair
  float* du_buf = dg_buf + kMmaRows * kWhStride;
  uint32_t* zg_hi = reinterpret_cast<uint32_t*>(smem + L.z);
  uint32_t* zg_lo = zg_hi + kMmaRows * (p.Rg / 2);
  uint32_t* zu_hi = zg_lo + kMmaRows * (p.Rg / 2);
  uint32_t* zu_lo = zu_hi + kMmaRows * (p.Ru / 2);
  uint32_t* gz_hi = reinterpret_cast<uint32_t*>(smem + L.gz);  // [kMmaRows, Rd / 2] by sorted row
  uint32_t* gz_mid = gz_hi + kMmaRows * (p.Rd / 2);
  uint32_t* gz_lo = gz_mid + kMmaRows * (p.Rd / 2);
  bf16* stages[2] = {reinterpret_cast<bf16*>(smem + L.stage),
                     reinterpret_cast<bf16*>(smem + L.stage + L.stage_bytes)};
  const bf16* grad_hbar = static_cast<const bf16*>(p.grad_hbar);
  const int64_t t0 = int64_t(blockIdx.x) * tokens_per_block;
  const int tokens = static_cast<int>(min(tokens_per_block, p.T - t0));
  const int64_t col_begin = int64_t(blockIdx.y) * block_cols;
  const int64_t col_end = min(p.I, col_begin + block_cols);
  stage_step(p, grad_hbar, L, stages[0], t0, tokens, col_begin, col_end);  // flies meanwhile
  cp_async_commit();
  const BlockRows b = setup_block(p, tokens_per_block, ids_s, weights_s, perm_s, zg_hi, zg_lo,
                                  zu_hi, zu_lo);
  const WarpRows& w = b.w;
  if (has_gzd) {  // grad_zd split into hi / mid / lo by sorted row
    const float* gzd = static_cast<const float*>(p.grad_zd);
    for (int i = threadIdx.x; i < b.rows * (Rd / 2); i += kMmaThreads) {
      const int row = i / (Rd / 2), kp = i % (Rd / 2);
      const float* src = gzd + (b.q0 + perm_s[row]) * Rd + 2 * kp;
      split3_bf16x2(src[0], src[1], gz_hi[i], gz_mid[i], gz_lo[i]);
    }
  }

  const float s = static_cast<float>(p.scale);
  const DropoutScale<float> drop(p.dropout_p, p.key);
  float dw[2] = {0.f, 0.f};         // dweights[pair[half]] over this thread's columns
  float zg_acc[2][R8][2] = {};      // dzg / s and dzu / s [pair[half], 8 rb + 2 c + v]
  float zu_acc[2][R8][2] = {};
  int st = 0;
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kMmaStep, st ^= 1) {
    if (c0 + kMmaStep < col_end) stage_step(p, grad_hbar, L, stages[st ^ 1], t0, tokens, c0 + kMmaStep, col_end);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* S = stages[st];

    float dgl[kMmaStep / 8][4] = {}, dul[kMmaStep / 8][4] = {}, adz[kMmaStep / 8][4] = {};
    if (p.Bg != nullptr) lora_update(w, zg_hi, zg_lo, S + L.bg, static_cast<int>(p.Rg), dgl);
    if (p.Bu != nullptr) lora_update(w, zu_hi, zu_lo, S + L.bu, static_cast<int>(p.Ru), dul);
    if (has_gzd) {  // adz[row, col] = sum_r grad_zd[row, r] * Ad[e(row), r, col]
      const int g = lane / 4;
      for (uint64_t left = w.used; left != 0; left &= left - 1) {
        const int e = __ffsll(static_cast<long long>(left)) - 1;
        for (int k0 = 0; k0 < Rd; k0 += 16) {
          const int ka = k0 + 2 * c, kb = ka + 8;
          uint32_t a_hi[4], a_mid[4], a_lo[4];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const bool mine = w.expert[half] == e;
            const int base = w.row[half] * (Rd / 2);
            a_hi[half] = mine && ka < Rd ? gz_hi[base + ka / 2] : 0u;
            a_mid[half] = mine && ka < Rd ? gz_mid[base + ka / 2] : 0u;
            a_lo[half] = mine && ka < Rd ? gz_lo[base + ka / 2] : 0u;
            a_hi[2 + half] = mine && kb < Rd ? gz_hi[base + kb / 2] : 0u;
            a_mid[2 + half] = mine && kb < Rd ? gz_mid[base + kb / 2] : 0u;
            a_lo[2 + half] = mine && kb < Rd ? gz_lo[base + kb / 2] : 0u;
          }
#pragma unroll
          for (int nt = 0; nt < kMmaStep / 8; ++nt) {
            const bf16* A_col = S + L.ad + e * Rd * kColStride + nt * 8 + g;  // Ad[e, :, col]
            const uint32_t b0 = ka < Rd ? gather_pair(A_col + ka * kColStride, kColStride) : 0u;
            const uint32_t b1 = kb < Rd ? gather_pair(A_col + kb * kColStride, kColStride) : 0u;
            mma_bf16(adz[nt], a_hi, b0, b1);
            mma_bf16(adz[nt], a_mid, b0, b1);
            mma_bf16(adz[nt], a_lo, b0, b1);
          }
        }
      }
    }

    // dh, dg, du at the accumulator positions; dg, du to the row buffers and, split, to the
    // A fragments of the dzg / dzu MMAs.
    uint32_t g_hi[4], g_mid[4], g_lo[4], u_hi[4], u_mid[4], u_lo[4];
#pragma unroll
    for (int nt = 0; nt < kMmaStep / 8; ++nt) {
      const int col = nt * 8 + 2 * c;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float dgv[2] = {0.f, 0.f}, duv[2] = {0.f, 0.f};
        if (w.pair[half] >= 0 && c0 + col < col_end) {
          const int at = b.tok[half] * kColStride + col;
          const float2 Gv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.g + at));
          const float2 Uv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.u + at));
          const float2 Hv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.gh + at));
          const float Gs[2] = {Gv.x, Gv.y}, Us[2] = {Uv.x, Uv.y}, gh[2] = {Hv.x, Hv.y};
#pragma unroll
          for (int v = 0; v < 2; ++v) {
            const float gv = p.Bg != nullptr ? Gs[v] + s * dgl[nt][2 * half + v] : Gs[v];
            const float uv = p.Bu != nullptr ? Us[v] + s * dul[nt][2 * half + v] : Us[v];
            const SwigluPoint<float> pt = swiglu_point<float, float>(p.activation, s, gv, uv, nullptr,
                                                                     nullptr, 0, nullptr, nullptr, 0);
            float dh = b.weight[half] * gh[v];
            if (has_gzd) {
              const float m = drop.active ? drop.factor(b.drop_base[half] + c0 + col + v) : 1.f;
              dh += m * adz[nt][2 * half + v];
            }
            dw[half] += gh[v] * pt.h;
            swiglu_point_grad(p.activation, pt, dh, &dgv[v], &duv[v]);
          }
          *reinterpret_cast<float2*>(dg_buf + w.pair[half] * kWhStride + col) = make_float2(dgv[0], dgv[1]);
          *reinterpret_cast<float2*>(du_buf + w.pair[half] * kWhStride + col) = make_float2(duv[0], duv[1]);
        }
        split3_bf16x2(dgv[0], dgv[1], g_hi[nt * 2 + half], g_mid[nt * 2 + half], g_lo[nt * 2 + half]);
        split3_bf16x2(duv[0], duv[1], u_hi[nt * 2 + half], u_mid[nt * 2 + half], u_lo[nt * 2 + half]);
      }
    }
    // dzg / s, dzu / s: Bg, Bu staged as [E, step columns, R + kPad] (ranks contiguous).
    if (p.Bg != nullptr) {
      const int Rg = static_cast<int>(p.Rg);
      pair_sums<R8>(w, g_hi, g_mid, g_lo, S + L.bg, Rg, kMmaStep * (Rg + kPad), 1, Rg + kPad, zg_acc);
    }
    if (p.Bu != nullptr) {
      const int Ru = static_cast<int>(p.Ru);
      pair_sums<R8>(w, u_hi, u_mid, u_lo, S + L.bu, Ru, kMmaStep * (Ru + kPad), 1, Ru + kPad, zu_acc);
    }

    __syncthreads();  // the row buffers are complete (and this stage is free for the next copy)
    combine_pairs(dg_buf, static_cast<bf16*>(p.dG), p.I, t0, tokens, static_cast<int>(p.k), c0, col_end);
    combine_pairs(du_buf, static_cast<bf16*>(p.dU), p.I, t0, tokens, static_cast<int>(p.k), c0, col_end);
  }

  // dweights: the quad's four lanes hold the row's column shares (fixed butterfly).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    dw[half] += __shfl_xor_sync(kFullMask, dw[half], 1);
    dw[half] += __shfl_xor_sync(kFullMask, dw[half], 2);
  }
  const int64_t N = p.T * p.k, total = 1 + p.Rg + p.Ru;
  const bool final = num_tiles == 1;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if (w.pair[half] < 0) continue;
    const int64_t q = b.q0 + w.pair[half];
    float* row = sums + (int64_t(blockIdx.y) * N + q) * total;  // partials
    if (c == 0) {
      if (final) static_cast<float*>(p.dweights)[q] = dw[half];
      else row[0] = dw[half];
    }
#pragma unroll
    for (int rb = 0; rb < R8; ++rb) {
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        const int r = rb * 8 + 2 * c + v;
        if (p.Bg != nullptr && r < p.Rg) {
          if (final) static_cast<float*>(p.dzg)[q * p.Rg + r] = s * zg_acc[half][rb][v];
          else row[1 + r] = zg_acc[half][rb][v];
        }
        if (p.Bu != nullptr && r < p.Ru) {
          if (final) static_cast<float*>(p.dzu)[q * p.Ru + r] = s * zu_acc[half][rb][v];
          else row[1 + p.Rg + r] = zu_acc[half][rb][v];
        }
      }
    }
  }
}

bool aligned_to_bytes(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

}  // namespace

bool mma_forward_supported(const MoeSwigluParams& p) {
  if (p.dtype != DType::kBFloat16) return false;
  if (p.E < 1 || p.E > kMmaMaxExperts || p.k < 1 || p.k > kMmaRows) return false;
  if (p.T * p.k < kMmaMinPairs) return false;
  if (p.I % 8 != 0) return false;  // whole 16-byte chunks of every staged row, hbar stores
  if (std::max({p.Rg, p.Ru, p.Rd}) > kMmaMaxRank) return false;
  // Bg / Bu rows of R ranks in R / 8 16-byte chunks, a power of two (stage_step).
  for (const int64_t R : {p.Rg, p.Ru}) {
    if (R % 8 != 0 || ((R / 8) & (R / 8 - 1)) != 0) return false;
  }
  const void* rows[] = {p.G, p.U, p.hbar, p.Bg, p.Bu, p.Ad};  // copied in 16-byte chunks
  for (const void* ptr : rows) {
    if (!aligned_to_bytes(ptr, 16)) return false;  // (null is aligned)
  }
  const MmaSmem layout(p.E, p.Rg, p.Ru, p.Rd, kMmaRows / p.k, false);
  if (static_cast<size_t>(layout.total) > kMmaMaxSmem) return false;  // many experts or ranks
  return device_has_mma();
}

bool mma_backward_supported(const MoeSwigluBackwardParams& p) {
  MoeSwigluParams as_forward{};
  static_cast<SwigluInputs&>(as_forward) = p;
  as_forward.hbar = p.dG;  // (dG, dU, grad_hbar: stored and staged like hbar, G, U)
  if (!mma_forward_supported(as_forward)) return false;
  if (!aligned_to_bytes(p.dU, 16) || !aligned_to_bytes(p.grad_hbar, 16)) return false;
  if (p.Rd % 2 != 0) return false;  // grad_zd split in rank pairs
  const MmaSmem layout(p.E, p.Rg, p.Ru, p.Rd, kMmaRows / p.k, true);
  return static_cast<size_t>(layout.total) <= kMmaMaxSmem;
}

namespace {

// Columns per block: kMmaBlockCols, halved (down to one step) while the grid has fewer than
// kMmaMinBlocks blocks, so that few tokens still spread over the device. Shapes only, never
// the device: the partials' grouping, hence the bits, are the same everywhere.
int64_t mma_block_cols(int64_t T, int64_t k, int64_t I) {
  const int64_t token_groups = (T + kMmaRows / k - 1) / (kMmaRows / k);
  int64_t cols = kMmaBlockCols;
  while (cols > kMmaStep && token_groups * ((I + cols - 1) / cols) < kMmaMinBlocks) cols /= 2;
  return cols;
}

}  // namespace

int64_t mma_column_tiles(int64_t T, int64_t k, int64_t I) {
  const int64_t cols = mma_block_cols(T, k, I);
  return std::max<int64_t>(1, (I + cols - 1) / cols);
}

cudaError_t launch_moe_swiglu_mma(const MoeSwigluParams& p, float* zd_tiles, cudaStream_t stream) {
  const int64_t tokens_per_block = kMmaRows / p.k;
  const dim3 grid(static_cast<unsigned>((p.T + tokens_per_block - 1) / tokens_per_block),
                  static_cast<unsigned>(mma_column_tiles(p.T, p.k, p.I)));
  const int64_t block_cols = mma_block_cols(p.T, p.k, p.I);
  const size_t smem = static_cast<size_t>(MmaSmem(p.E, p.Rg, p.Ru, p.Rd, tokens_per_block, false).total);
  auto launch = [&](auto kernel) {
    const cudaError_t err = allow_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kMmaThreads, smem, stream>>>(p, tokens_per_block, block_cols, zd_tiles);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  };
  if (p.Rd <= 16) return launch(moe_swiglu_mma_kernel<2>);
  return launch(moe_swiglu_mma_kernel<kMmaMaxRank / 8>);
}

cudaError_t launch_moe_swiglu_bwd_mma(const MoeSwigluBackwardParams& p, float* sums, int64_t num_tiles,
                                      cudaStream_t stream) {
  const int64_t tokens_per_block = kMmaRows / p.k;
  const dim3 grid(static_cast<unsigned>((p.T + tokens_per_block - 1) / tokens_per_block),
                  static_cast<unsigned>(mma_column_tiles(p.T, p.k, p.I)));
  const int64_t block_cols = mma_block_cols(p.T, p.k, p.I);
  const size_t smem = static_cast<size_t>(MmaSmem(p.E, p.Rg, p.Ru, p.Rd, tokens_per_block, true).total);
  auto launch = [&](auto kernel) {
    const cudaError_t err = allow_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kMmaThreads, smem, stream>>>(p, tokens_per_block, block_cols, sums, num_tiles);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  };
  if (std::max(p.Rg, p.Ru) <= 16) return launch(moe_swiglu_bwd_mma_kernel<2>);
  return launch(moe_swiglu_bwd_mma_kernel<kMmaMaxRank / 8>);
}

}  // namespace cuda
}  // namespace mixlora
