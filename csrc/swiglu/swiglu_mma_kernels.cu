// Tensor-core forward and backward pass 1 of the fused expert SwiGLU and combine for bfloat16
// (docs/design.md, "Fused expert SwiGLU"; bench/NOTES.md v3 and v4 have the why and the numbers).
//
// The CUDA-core kernel (swiglu_kernels.cu) spends ~11 instructions per (pair, column) on the
// rank-r products. Here they are warp MMAs (mma.sync m16n8k16, bf16 in, fp32 accumulate):
//   delta_g[pairs, cols] = Zg_masked [pairs, E x Rg] @ Bg^T  (Zg_masked: pair q's zg in the
//   delta_u likewise with Zu_masked and Bu                    columns of its expert, else 0)
//   zd_all[pairs, E x Rd] = drop(h) [pairs, cols] @ Ad^T      (pair q keeps its expert's Rd)
// (g = G + s * delta_g, u = U + s * delta_u.)
// The block's pairs are ordered by expert (a counting sort in shared memory), so each warp's
// 16 rows span few experts (1.8 on average at E = 8, k = 2), and a warp skips the experts none
// of its rows uses. The rank-r products take bf16 operands with fp32 accumulation, as a LoRA in
// bf16 computes them: z, drop(h) and, in the backward, grad_zd, dg and du are rounded to bf16
// (docs/design.md, "Fused expert SwiGLU"; until v12 they were split into two or three bf16
// terms to keep fp32's accuracy, bench/NOTES.md v12). With ranks up to 16 (R8 == 2) each
// thread holds its rows' z fragments in registers for the whole block.
// B fragments come from the staged tiles through ldmatrix (.trans where the tile's rows are
// the MMA's k). The SiLU is the fast one of swiglu_fast_math.cuh.
//
// Block: 8 warps, 128 pair rows (kMmaRows / k whole tokens), mma_block_cols columns taken
// kMmaStep at a time; warp w owns sorted rows 16w .. 16w + 15. Each step's weight tiles (Bg, Bu,
// Ad of every expert on the step's columns) and G / U tiles are copied to shared memory with
// cp.async one step ahead (two stages; one where two do not fit or one lets a second block
// share the SM: mma_layout, begin_step). Per step each warp computes its delta_g, delta_u tile
// in MMA accumulators, g, u, h in the accumulator layout (which is also the A layout of the zd MMA, so
// h never leaves registers), w * h to shared memory for the combine over j (in j order, by the
// whole block), and adds its zd MMA results to per-thread accumulators (each (pair, rank) owned
// by one thread). One barrier per step: the row buffers alternate between even and odd steps,
// and step s combines step s - 1's rows. zd's per-tile sums go to zd_tiles, added in tile order
// by the caller. Fixed MMA and summation order: bitwise deterministic.
//
// The backward's first pass has the same blocks and steps. It recomputes the LoRA deltas of g
// and u as above, adds ad_gz = grad_zd_masked [pairs, E x Rd] @ Ad, and takes the per-pair sums
// dzg / s = dg [pairs, cols] @ Bg and dzu / s = du @ Bu as MMAs of the gradients in the
// accumulator layout. dG and dU go through shared memory for the combine over j; dweights is
// summed by each thread over its columns, then over its quad. The weight gradients (pass 2,
// expert-major) are in swiglu_wgrad_mma_kernels.cu.
//
// Both kernels have an instance without LoRA dropout (DROP = false) whose per-element work has
// no dropout code and no bounds branches, and whose gate and up deltas are one walk over the
// warp's experts (bench/NOTES.md v11); dropout takes the DROP = true instance.
#include <algorithm>
#include <cassert>

#include "swiglu/swiglu_fast_math.cuh"
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
constexpr int kWhStride = kMmaStep + 4;      // row buffer stride (floats): 8 consecutive rows'
                                             // float2 in distinct banks, 16-byte aligned rows
constexpr int kMmaMaxRank = 64;
constexpr int kMmaMaxExperts = 64;
// Static shared memory of both kernels (ids_s and perm_s as int16: experts < 64 and rows < 128;
// weights_s); the dynamic part may take what the device lets one block opt in to beyond it.
// Up to ~110 KiB two blocks fit on an SM; more (many experts or ranks: E = 16, r = 64) runs one
// block of 8 warps per SM, still far ahead of the CUDA-core kernels (bench/NOTES.md v4, v5).
// 1 KiB: the r = 64 backward's two stages (226 KiB) fit beside it on sm_90 (bench/NOTES.md v12).
constexpr size_t kMmaStaticSmem = (2 * sizeof(int16_t) + sizeof(float)) * kMmaRows;

// threadIdx.x, read where it is used: asm volatile is not hoisted out of loops, so what
// stage_step derives from it is recomputed each step (~15 instructions) instead of being kept
// live across the column loop, where at 128 registers the backward spilled it and stalled on
// the reloads (bench/NOTES.md v4).
__device__ __forceinline__ int thread_index_here() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

// OR over the warp (a fixed butterfly).
__device__ __forceinline__ unsigned warp_or(unsigned v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v |= __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Shared-memory layout of a block (every offset 16-byte aligned): fp32 row buffers
// [kMmaRows, kWhStride] for two steps (the forward's w * h; the backward's dg and du), z (gate
// and up) as bf16 words by sorted row (only with ranks above 16: else z is held in registers,
// RegFrags), in the backward grad_zd as bf16 words, and
// `stages` stages (two: the next step's copies fly during this step's math; one where two do
// not fit, the r = 64 backward), each holding a step's Bg [E, kMmaStep, Rg + kPad],
// Bu [E, kMmaStep, Ru + kPad], Ad [E, Rd, kColStride] and G, U (and in the backward grad_hbar)
// [tokens, kColStride] (bf16). Built on the host (mma_layout), passed to the kernels by value.
struct MmaSmem {
  // 32-bit (E, ranks <= 64, so a layout is a few hundred KiB at most): as 64-bit kernel
  // parameters, the backward's offset math raised its spills.
  // The row buffers are at offset 0: known at compile time, hence 16-byte aligned, which keeps
  // combine_pairs' loads 128-bit (at a run-time offset they were scalar: +7% time).
  int32_t z, gz, stage, stage_bytes;  // byte offsets / sizes
  int32_t bg, bu, ad, g, u, gh;             // element offsets inside a stage
  int32_t total;
  int32_t stages;

  MmaSmem(int64_t E, int64_t Rg, int64_t Ru, int64_t Rd, int64_t tokens, bool backward,
          int num_stages) {
    const bool z_regs = std::max(Rg, Ru) <= 16 && Rd <= 16;  // the kernels' R8 == 2
    const int64_t z_at = int64_t(sizeof(float)) * kMmaRows * kWhStride * (backward ? 4 : 2);
    const int64_t gz_at = z_at + (z_regs ? 0 : int64_t(sizeof(uint32_t)) * kMmaRows * (Rg / 2 + Ru / 2));
    const int64_t stage_at = gz_at + (backward ? int64_t(sizeof(uint32_t)) * kMmaRows * (Rd / 2) : 0);
    const int64_t bu_at = E * kMmaStep * (Rg > 0 ? Rg + kPad : 0);
    const int64_t ad_at = bu_at + E * kMmaStep * (Ru > 0 ? Ru + kPad : 0);
    const int64_t g_at = ad_at + E * Rd * kColStride;
    const int64_t gh_at = g_at + 2 * tokens * kColStride;
    const int64_t bytes = int64_t(sizeof(bf16)) * (gh_at + (backward ? tokens * kColStride : 0));
    z = static_cast<int32_t>(z_at);
    gz = static_cast<int32_t>(gz_at);
    stage = static_cast<int32_t>(stage_at);
    stage_bytes = static_cast<int32_t>(bytes);
    bg = 0;
    bu = static_cast<int32_t>(bu_at);
    ad = static_cast<int32_t>(ad_at);
    g = static_cast<int32_t>(g_at);
    u = static_cast<int32_t>(g_at + tokens * kColStride);
    gh = static_cast<int32_t>(gh_at);
    stages = num_stages;
    total = static_cast<int32_t>(stage_at + stages * bytes);
  }
};

// The layout of a block of the forward (backward: pass 1) kernel on the current device: two
// stages, unless one stage lets a second block share the SM where two do not (the E = 16
// backward: 142 KiB with two stages, 97 KiB with one) or two do not fit at all (the r = 64
// backward); stages == 0 where not even one fits.
MmaSmem mma_layout(const SwigluInputs& p, bool backward) {
  const DeviceCaps caps = current_device_caps();
  const int64_t tokens = kMmaRows / p.k;
  const MmaSmem two(p.E, p.Rg, p.Ru, p.Rd, tokens, backward, 2);
  const MmaSmem one(p.E, p.Rg, p.Ru, p.Rd, tokens, backward, 1);
  const int64_t limit = int64_t(caps.smem_optin) - int64_t(kMmaStaticSmem);
  // Blocks per SM: registers allow two up to rank 16 (128 per thread), one above; each block
  // also takes the runtime's 1 KiB reserve.
  const int64_t reg_blocks = std::max({p.Rg, p.Ru, p.Rd}) <= 16 ? 2 : 1;
  auto blocks = [&](const MmaSmem& L) {
    return std::min(reg_blocks, int64_t(caps.smem_per_sm) / (L.total + int64_t(kMmaStaticSmem) + 1024));
  };
  if (two.total <= limit && (blocks(two) >= blocks(one))) return two;
  if (one.total <= limit) return one;
  return MmaSmem(p.E, p.Rg, p.Ru, p.Rd, tokens, backward, 0);
}

// A warp's view of its 16 MMA rows. The block's pairs are ordered by expert, so a warp's rows
// span few experts and the masked MMAs skip the rest.
struct WarpRows {
  int row[2];     // this thread's fragment rows: 16 w + lane / 4, and + 8
  int pair[2];    // the block pair at that row, -1 past the block's pairs
  int expert[2];  // its expert, -1 past the block's pairs
  uint64_t used;  // bit e: some row of the warp belongs to expert e
  int e_first, e_last;  // the lowest and highest such e (rows are sorted: few in between)
};

// Calls f(e) for each expert e some row of the warp belongs to, ascending. (A counted loop
// over [e_first, e_last] with a bit test: cheaper than finding set bits of the 64-bit mask.)
template <typename F>
__device__ __forceinline__ void for_each_expert(const WarpRows& w, F&& f) {
  for (int e = w.e_first; e <= w.e_last; ++e) {
    if ((w.used >> e) & 1u) f(e);
  }
}

// a's rows of expert e (A fragment registers: (row0, k) (row1, k) (row0, k + 8) (row1, k + 8)),
// the other rows zero.
__device__ __forceinline__ void mask_rows(const WarpRows& w, int e, const uint32_t (&a)[4],
                                          uint32_t (&am)[4]) {
  const bool m0 = w.expert[0] == e, m1 = w.expert[1] == e;
  am[0] = m0 ? a[0] : 0u;
  am[1] = m1 ? a[1] : 0u;
  am[2] = m0 ? a[2] : 0u;
  am[3] = m1 ? a[3] : 0u;
}

// The A fragments (k-chunk k0) of a warp's rows of some per-pair rank-R values as bf16 words,
// masked to the rows of expert e: regs (row0, k) (row1, k) (row0, k + 8) (row1, k + 8) with
// k = k0 + 2 c, and zero past R. SmemFrags reads them from shared memory each time (an array
// [kMmaRows, R / 2] of words, by sorted row); RegFrags (z, R <= 16: one k-chunk) rounds them
// from global memory once per block and keeps them in registers: the values do not change from
// step to step, and the per-step loads and their address math were ~40% of the forward's
// instructions (bench/NOTES.md v4).
struct SmemFrags {
  static constexpr bool kOneChunk = false;
  const uint32_t* words;
  int R;

  __device__ __forceinline__ void operator()(const WarpRows& w, int e, int k0, uint32_t (&a)[4]) const {
    const int ka = k0 + 2 * (threadIdx.x % 4), kb = ka + 8;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const bool mine = w.expert[half] == e;
      const int base = w.row[half] * (R / 2);
      a[half] = mine && ka < R ? words[base + ka / 2] : 0u;
      a[2 + half] = mine && kb < R ? words[base + kb / 2] : 0u;
    }
  }
};

struct RegFrags {
  static constexpr bool kOneChunk = true;  // R <= 16
  uint32_t v[4];  // unmasked; zero for rows past the block's pairs

  // From z [N, R] fp32 in global memory, rounded to bf16, pair q0 + w.pair[half].
  __device__ __forceinline__ RegFrags(const WarpRows& w, const float* z, int64_t q0, int R) {
    const int ka = 2 * (threadIdx.x % 4), kb = ka + 8;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      v[half] = v[2 + half] = 0u;
      if (w.pair[half] < 0 || z == nullptr) continue;
      const float* row = z + (q0 + w.pair[half]) * R;
      if (ka < R) v[half] = pack_bf16x2(__floats2bfloat162_rn(row[ka], row[ka + 1]));
      if (kb < R) v[2 + half] = pack_bf16x2(__floats2bfloat162_rn(row[kb], row[kb + 1]));
    }
  }

  __device__ __forceinline__ void operator()(const WarpRows& w, int e, int /*k0: 0*/,
                                             uint32_t (&a)[4]) const {
    mask_rows(w, e, v, a);
  }
};

// z's fragments: RegFrags from global memory when kRegs (ranks <= 16), else the shared-memory
// reader of the words setup_block wrote.
template <bool kRegs>
__device__ __forceinline__ auto z_frags(const WarpRows& w, const float* z, int64_t q0,
                                        const SmemFrags& words) {
  if constexpr (kRegs) {
    return RegFrags(w, z, q0, words.R);
  } else {
    return words;
  }
}

// acc[nt] += A_masked @ B for the step's n-tiles: over the experts e the warp uses and the
// k-chunks k0 of R, frags(w, e, k0, a) the A fragments of the rows of expert e and
// b_frag(e, k0, b) the B registers of expert e: b[2 nt] for k rows k0 + 0..7, b[2 nt + 1] for
// k0 + 8..15 (zero past R).
template <typename Frags, typename BFrag>
__device__ __forceinline__ void masked_mma(const WarpRows& w, const Frags& frags, int R,
                                           BFrag&& b_frag, float (&acc)[kMmaStep / 8][4]) {
  for_each_expert(w, [&](int e) {
    for (int k0 = 0; k0 < (Frags::kOneChunk ? 1 : R); k0 += 16) {
      uint32_t a[4], b[4];
      frags(w, e, k0, a);
      b_frag(e, k0, b);
#pragma unroll
      for (int nt = 0; nt < kMmaStep / 8; ++nt) mma_bf16(acc[nt], a, b[2 * nt], b[2 * nt + 1]);
    }
  });
}

// acc[nt] += (Z_masked @ B^T) for the step's n-tiles: the rows of each expert e times the
// staged B[e, step columns, :]^T (z rounded to bf16). B's rows are the n index (step column),
// k (rank) contiguous: ldmatrix matrices (n 0-7, k0 0-7) (n 0-7, k0 8-15) (n 8-15, ..) (..).
template <typename Frags>
__device__ __forceinline__ void lora_update(const WarpRows& w, const Frags& z, const bf16* B_s, int R,
                                            float (&acc)[kMmaStep / 8][4]) {
  const int lane = threadIdx.x % kWarpSize, col_stride = R + kPad;
  const bf16* lane_row = B_s + ((lane / 16) * 8 + lane % 8) * col_stride + (lane / 8 % 2) * 8;
  masked_mma(w, z, R, [&](int e, int k0, uint32_t (&b)[4]) {
    ldmatrix_x4(b, lane_row + e * kMmaStep * col_stride + k0);
    if (k0 + 8 >= R) b[1] = b[3] = 0u;  // (R = 8: k 8..15 is the rows' padding)
  }, acc);
}

// lora_update of the gate and the up LoRA in one walk over the warp's experts (both present,
// ranks <= 16: one k-chunk, z in registers): four independent MMAs per expert (g and u, two
// n-tiles each) instead of two walks of two, and one loop's overhead.
template <typename Frags>
__device__ __forceinline__ void lora_update_gu(const WarpRows& w, const Frags& zg, const Frags& zu,
                                               const bf16* Bg_s, const bf16* Bu_s, int Rg, int Ru,
                                               float (&dg)[kMmaStep / 8][4],
                                               float (&du)[kMmaStep / 8][4]) {
  static_assert(Frags::kOneChunk, "ranks <= 16");
  const int lane = threadIdx.x % kWarpSize;
  const int lane_off = ((lane / 16) * 8 + lane % 8);
  const bf16* g_row = Bg_s + lane_off * (Rg + kPad) + (lane / 8 % 2) * 8;
  const bf16* u_row = Bu_s + lane_off * (Ru + kPad) + (lane / 8 % 2) * 8;
  const int g_expert = kMmaStep * (Rg + kPad), u_expert = kMmaStep * (Ru + kPad);
#pragma unroll 1
  for (int e = w.e_first; e <= w.e_last; ++e) {
    if (((w.used >> e) & 1u) == 0) continue;
    uint32_t ag[4], au[4], bg[4], bu[4];
    zg(w, e, 0, ag);
    zu(w, e, 0, au);
    ldmatrix_x4(bg, g_row + e * g_expert);
    ldmatrix_x4(bu, u_row + e * u_expert);
    if (Rg <= 8) bg[1] = bg[3] = 0u;  // (R = 8: k 8..15 is the rows' padding)
    if (Ru <= 8) bu[1] = bu[3] = 0u;
#pragma unroll
    for (int nt = 0; nt < kMmaStep / 8; ++nt) {
      mma_bf16(dg[nt], ag, bg[2 * nt], bg[2 * nt + 1]);
      mma_bf16(du[nt], au, bu[2 * nt], bu[2 * nt + 1]);
    }
  }
}

// delta_g and delta_u of a step (staged at S): the gate and up LoRAs' updates, in one walk over
// the warp's experts where both are present and z is in registers (R8 == 2).
template <int R8, typename Frags>
__device__ __forceinline__ void lora_deltas(const SwigluInputs& p, const WarpRows& w,
                                            const Frags& zg, const Frags& zu, const bf16* S,
                                            const MmaSmem& L, float (&dg)[kMmaStep / 8][4],
                                            float (&du)[kMmaStep / 8][4]) {
  const int Rg = static_cast<int>(p.Rg), Ru = static_cast<int>(p.Ru);
  if constexpr (R8 == 2) {
    if (p.Bg != nullptr && p.Bu != nullptr) {
      lora_update_gu(w, zg, zu, S + L.bg, S + L.bu, Rg, Ru, dg, du);
      return;
    }
  }
  if (p.Bg != nullptr) lora_update(w, zg, S + L.bg, Rg, dg);
  if (p.Bu != nullptr) lora_update(w, zu, S + L.bu, Ru, du);
}

// The per-pair sums over the step's columns of A_cols [rows, 16 step columns] (bf16, in the
// accumulator = A layout) times a staged weight, accumulated in acc: for each expert e the warp
// uses, A masked to the rows of e times W(e) for each n-tile rb of 8 of its R ranks, so that
// acc[half][rb][v] (rank 8 rb + 2 c + v; the MMA accumulator layout, rows row[half]) sums
// A[row, col] * W(e(row), r, col). b_frag(e, rb, b) gives the B registers of n-tiles rb
// (b[0], b[1]: k = step columns 0..7, 8..15) and rb + 1 (b[2], b[3]).
template <int R8, typename BFrag>
__device__ __forceinline__ void pair_sums(const WarpRows& w, const uint32_t (&a)[4], int R,
                                          BFrag&& b_frag, float (&acc)[2][R8][2]) {
  for_each_expert(w, [&](int e) {
    uint32_t am[4];
    mask_rows(w, e, a, am);
#pragma unroll
    for (int rb = 0; rb < R8; rb += 2) {
      if (rb * 8 >= R) break;
      uint32_t b[4];
      b_frag(e, rb, b);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if ((rb + j) * 8 >= R) break;
        float cz[4] = {acc[0][rb + j][0], acc[0][rb + j][1], acc[1][rb + j][0], acc[1][rb + j][1]};
        mma_bf16(cz, am, b[2 * j], b[2 * j + 1]);
        acc[0][rb + j][0] = cz[0];
        acc[0][rb + j][1] = cz[1];
        acc[1][rb + j][0] = cz[2];
        acc[1][rb + j][1] = cz[3];
      }
    }
  });
}

// pair_sums for ranks <= 16 (R8 == 2): both n-tiles of 8 ranks from one ldmatrix, two
// independent MMAs per expert (ranks past R read clamped rows or the rows' padding; their sums
// are never stored).
template <typename BFrag>
__device__ __forceinline__ void pair_sums16(const WarpRows& w, const uint32_t (&a)[4],
                                            BFrag&& b_frag, float (&acc)[2][2][2]) {
  float cz[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    cz[j][0] = acc[0][j][0];
    cz[j][1] = acc[0][j][1];
    cz[j][2] = acc[1][j][0];
    cz[j][3] = acc[1][j][1];
  }
#pragma unroll 1
  for (int e = w.e_first; e <= w.e_last; ++e) {
    if (((w.used >> e) & 1u) == 0) continue;
    uint32_t b[4], am[4];
    b_frag(e, 0, b);
    mask_rows(w, e, a, am);
#pragma unroll
    for (int j = 0; j < 2; ++j) mma_bf16(cz[j], am, b[2 * j], b[2 * j + 1]);
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    acc[0][j][0] = cz[j][0];
    acc[0][j][1] = cz[j][1];
    acc[1][j][0] = cz[j][2];
    acc[1][j][1] = cz[j][3];
  }
}

// Issues the cp.async copies of step c0's tiles into one stage (columns past col_end, zeros).
// Thread i copies chunk i % C of rows i / C, i / C + kMmaThreads / C, ... of each tile, C its
// 16-byte chunks per row (a power of two dividing kMmaThreads). Offsets are 32-bit
// (mma_forward_supported checks the sizes) and only c0 changes from step to step: ~40
// instructions per thread and step instead of ~150 with 64-bit index math (bench/NOTES.md v4).
// grad_hbar: null in the forward.
__device__ __forceinline__ void stage_step(const SwigluInputs& p, const bf16* grad_hbar,
                                           const MmaSmem& L, bf16* st, int64_t t0, int tokens,
                                           int64_t c0, int64_t col_end) {
  constexpr int kChunks = kMmaStep / 8;  // 16-byte chunks of a step row of G, U, Ad
  const int tid = thread_index_here(), E = static_cast<int>(p.E), I = static_cast<int>(p.I);
  const int cols_left = static_cast<int>(col_end - c0);
  for (int pass = 0; pass < 2; ++pass) {  // Bg, Bu: rows (e, step column) of R ranks, from [E, I, R]
    const bf16* B = static_cast<const bf16*>(pass == 0 ? p.Bg : p.Bu);
    const int R = static_cast<int>(pass == 0 ? p.Rg : p.Ru);
    if (B == nullptr) continue;
    const int shift = __ffs(R / 8) - 1;              // R / 8 chunks per row
    const int row0 = tid >> shift, rows_step = kMmaThreads >> shift;  // a multiple of kMmaStep:
    const int col = row0 % kMmaStep;                 // every row of the thread has this column
    const bool valid = col < cols_left;
    const int chunk8 = (tid & (R / 8 - 1)) * 8;
    const bf16* src = B + (valid ? c0 * R + ((row0 / kMmaStep) * I + col) * R + chunk8 : 0);
    const int src_step = valid ? (rows_step / kMmaStep) * I * R : 0;
    bf16* dst = st + (pass == 0 ? L.bg : L.bu) + row0 * (R + kPad) + chunk8;
    for (int row = row0; row < E * kMmaStep; row += rows_step) {
      cp_async16_zfill(dst, src, valid);
      src += src_step;
      dst += rows_step * (R + kPad);
    }
  }
  const int chunk8 = (tid % kChunks) * 8, row0 = tid / kChunks;
  constexpr int kRowsStep = kMmaThreads / kChunks;
  const bool valid = chunk8 < cols_left;
  const int64_t col = valid ? c0 + chunk8 : 0;
  if (p.Ad != nullptr) {  // Ad: rows (e, r) of the step's columns, from [E, Rd, I]
    const bf16* src = static_cast<const bf16*>(p.Ad) + col + row0 * I;
    bf16* dst = st + L.ad + row0 * kColStride + chunk8;
    for (int row = row0; row < E * p.Rd; row += kRowsStep) {
      cp_async16_zfill(dst, src, valid);
      src += kRowsStep * I;
      dst += kRowsStep * kColStride;
    }
  }
  // G, U (and grad_hbar) rows of the block's tokens.
  const int64_t block_col = t0 * p.I + col;
  for (int t = row0; t < tokens; t += kRowsStep) {
    const int at = t * kColStride + chunk8, from = t * I;
    cp_async16_zfill(st + L.g + at, static_cast<const bf16*>(p.G) + block_col + from, valid);
    cp_async16_zfill(st + L.u + at, static_cast<const bf16*>(p.U) + block_col + from, valid);
    if (grad_hbar != nullptr) cp_async16_zfill(st + L.gh + at, grad_hbar + block_col + from, valid);
  }
}

// stage_step's copies with the per-thread offsets that do not change from step to step
// computed once per block, for both kernels without dropout (v11: the forward; v14: the
// backward's pass 1 too, which after v12 keeps them at 128 registers without spills): per step
// 32-bit offsets, shifts instead of divisions, and the copies: ~110 instructions against
// stage_step's ~150 of 64-bit index math (bench/NOTES.md v11). The same copies into the same
// places as stage_step (grad_hbar: null in the forward).
struct StagePlan {
  int32_t b_src[2], b_dst[2];  // Bg, Bu: the thread's first row, without the c0 * R term
  int32_t b_col[2];            // the step column of all its Bg / Bu rows
  int32_t col8;                // the step column of its Ad, G and U chunks
  int32_t ad_src, ad_dst;      // Ad: its first row, without c0
  int32_t x_src, x_dst;        // G, U: its first token row, without t0 * I + c0

  __device__ __forceinline__ StagePlan(const SwigluInputs& p, const MmaSmem& L) {
    const int tid = threadIdx.x, I = static_cast<int>(p.I);
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      const int R = static_cast<int>(pass == 0 ? p.Rg : p.Ru);
      const int shift = R > 0 ? __ffs(R / 8) - 1 : 0;
      const int row0 = tid >> shift, chunk8 = (tid & (max(R, 8) / 8 - 1)) * 8;
      b_col[pass] = row0 % kMmaStep;
      b_src[pass] = ((row0 / kMmaStep) * I + b_col[pass]) * R + chunk8;
      b_dst[pass] = (pass == 0 ? L.bg : L.bu) + row0 * (R + kPad) + chunk8;
    }
    constexpr int kChunks = kMmaStep / 8;
    col8 = (tid % kChunks) * 8;
    const int row0 = tid / kChunks;
    ad_src = row0 * I + col8;
    ad_dst = L.ad + row0 * kColStride + col8;
    x_src = row0 * I + col8;
    x_dst = row0 * kColStride + col8;
  }
};

__device__ __forceinline__ void stage_step_planned(const SwigluInputs& p, const bf16* grad_hbar,
                                                   const StagePlan& pl, const MmaSmem& L, bf16* st,
                                                   int64_t t0, int tokens, int64_t c0,
                                                   int64_t col_end) {
  // Every offset here is 32-bit and relative to a tensor's start (mma_forward_supported checks
  // the sizes); one 64-bit multiply-add per copy forms its address.
  const int E = static_cast<int>(p.E), I = static_cast<int>(p.I);
  const int cols_left = static_cast<int>(col_end - c0), c = static_cast<int>(c0);
  const int tid = thread_index_here();
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    const bf16* B = static_cast<const bf16*>(pass == 0 ? p.Bg : p.Bu);
    const int R = static_cast<int>(pass == 0 ? p.Rg : p.Ru);
    if (B == nullptr) continue;
    const int shift = __ffs(R / 8) - 1;
    const int rows_step = kMmaThreads >> shift;  // a multiple of kMmaStep: E rows at a time
    static_assert((kMmaThreads & (kMmaThreads - 1)) == 0, "rows_step is a power of two");
    const int n = (E * kMmaStep - (tid >> shift) + rows_step - 1) >> (__ffs(kMmaThreads) - 1 - shift);
    const bool valid = pl.b_col[pass] < cols_left;
    int src = valid ? c * R + pl.b_src[pass] : 0;
    const int src_step = valid ? (rows_step / kMmaStep) * I * R : 0;
    unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(st + pl.b_dst[pass]));
    const unsigned dst_step = rows_step * (R + kPad) * sizeof(bf16);
#pragma unroll 1
    for (int i = 0; i < n; ++i, src += src_step, dst += dst_step) {
      cp_async16_zfill_shared(dst, B + src, valid);
    }
  }
  constexpr int kRowsStep = kMmaThreads / (kMmaStep / 8);
  const bool valid = pl.col8 < cols_left;
  const int row0 = tid / (kMmaStep / 8);
  if (p.Ad != nullptr) {
    const int n = static_cast<int>(static_cast<unsigned>(E * static_cast<int>(p.Rd) - row0 + kRowsStep - 1) / kRowsStep);
    int src = valid ? c + pl.ad_src : 0;
    const int src_step = valid ? kRowsStep * I : 0;
    unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(st + pl.ad_dst));
#pragma unroll 1
    for (int i = 0; i < n; ++i, src += src_step, dst += kRowsStep * kColStride * sizeof(bf16)) {
      cp_async16_zfill_shared(dst, static_cast<const bf16*>(p.Ad) + src, valid);
    }
  }
  if (row0 < tokens) {  // (kRowsStep >= the block's tokens: one row of G and U at most)
    const int64_t at = valid ? t0 * p.I + (c + pl.x_src) : 0;
    cp_async16_zfill(st + L.g + pl.x_dst, static_cast<const bf16*>(p.G) + at, valid);
    cp_async16_zfill(st + L.u + pl.x_dst, static_cast<const bf16*>(p.U) + at, valid);
    if (grad_hbar != nullptr) cp_async16_zfill(st + L.gh + pl.x_dst, grad_hbar + at, valid);
  }
}

// Step c0's start, in the block's step loop (st: 0, 1, 0, .. from col_begin): its tiles landed
// and seen by every thread, and every thread done with step c0 - kMmaStep's. With two stages
// the copies of step c0 + kMmaStep go to the other stage now (one barrier per step); with one,
// step c0's own copies are issued here once the last step's reads are done (two barriers, no
// overlap of copies and math within the block). issue(stage, c) issues step c's copies into
// stage (stage_step or stage_step_planned). Returns step c0's stage. STAGES is the layout's, a
// template argument of the kernels: tested at run time it cost the r = 16 backward 5%
// (bench/NOTES.md v5).
template <int STAGES, typename Issue>
__device__ __forceinline__ const bf16* begin_step(const MmaSmem& L, unsigned char* smem, int st,
                                                  int64_t c0, int64_t col_begin, int64_t col_end,
                                                  Issue&& issue) {
  // (Stage i by arithmetic, not a pointer array: that would live in local memory and make
  // every staged read a generic load.)
  auto stage = [&](int i) { return reinterpret_cast<bf16*>(smem + L.stage + i * L.stage_bytes); };
  constexpr bool one_stage = STAGES == 1;
  if constexpr (one_stage) {
    if (c0 > col_begin) {
      __syncthreads();
      issue(stage(0), c0);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  if constexpr (!one_stage) {
    if (c0 + kMmaStep < col_end) {
      issue(stage(st ^ 1), c0 + kMmaStep);
      cp_async_commit();
    }
  }
  return stage(one_stage ? 0 : st);
}

// What both kernels set up once per block: the pairs' experts and weights, their counting sort
// by expert into rows, z of the gate and up LoRAs as bf16 words by row (ranks above 16), and
// the thread's WarpRows.
struct BlockRows {
  int64_t t0, q0;
  int tokens, rows;
  WarpRows w;
  int tok[2];            // the fragment row's token in the block
  int64_t drop_base[2];  // its dropout index base q * I
  float weight[2];       // its routing weight
  int slot[2];           // its row of the row buffers: its pair; rows past the pairs their own
                         // row (>= the block's pairs: the combine never reads it)
};

__device__ __forceinline__ BlockRows setup_block(const SwigluInputs& p, int64_t tokens_per_block,
                                                 int16_t* ids_s, float* weights_s, int16_t* perm_s,
                                                 bool z_smem, uint32_t* zg_words,
                                                 uint32_t* zu_words) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4;
  const int k = static_cast<int>(p.k);
  BlockRows b;
  b.t0 = int64_t(blockIdx.x) * tokens_per_block;
  b.tokens = static_cast<int>(min(tokens_per_block, p.T - b.t0));
  b.rows = b.tokens * k;
  b.q0 = b.t0 * p.k;
  const float* weights = static_cast<const float*>(p.weights);
  for (int r = threadIdx.x; r < kMmaRows; r += kMmaThreads) {
    const int32_t id = r < b.rows ? p.ids[b.q0 + r] : -1;
    assert(id < p.E);  // (then it fits int16: E <= kMmaMaxExperts)
    ids_s[r] = static_cast<int16_t>(id);
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
  for (int pass = 0; pass < 2 && z_smem; ++pass) {  // zg, zu as bf16 words by sorted row
    const float* z = static_cast<const float*>(pass == 0 ? p.zg : p.zu);
    const int R = static_cast<int>(pass == 0 ? p.Rg : p.Ru);
    if ((pass == 0 ? p.Bg : p.Bu) == nullptr) continue;
    uint32_t* words = pass == 0 ? zg_words : zu_words;
    for (int i = threadIdx.x; i < b.rows * (R / 2); i += kMmaThreads) {
      const int row = i / (R / 2), kp = i % (R / 2);
      const float* src = z + (b.q0 + perm_s[row]) * R + 2 * kp;
      words[i] = pack_bf16x2(__floats2bfloat162_rn(src[0], src[1]));
    }
  }

  unsigned used_lo = 0, used_hi = 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    b.w.row[half] = warp * 16 + g + 8 * half;
    b.w.pair[half] = perm_s[b.w.row[half]];
    const int pair = max(b.w.pair[half], 0);  // (rows past the pairs compute nothing)
    const int e = b.w.pair[half] >= 0 ? ids_s[pair] : -1;
    b.w.expert[half] = e;
    if (e >= 0 && e < 32) used_lo |= 1u << e;
    if (e >= 32) used_hi |= 1u << (e - 32);
    b.tok[half] = pair / k;
    b.drop_base[half] = (b.q0 + pair) * p.I;
    b.weight[half] = weights_s[pair];
    b.slot[half] = b.w.pair[half] >= 0 ? b.w.pair[half] : b.w.row[half];
  }
  b.w.used = (uint64_t(warp_or(used_hi)) << 32) | warp_or(used_lo);
  b.w.e_first = b.w.used == 0 ? 0 : __ffsll(static_cast<long long>(b.w.used)) - 1;
  b.w.e_last = b.w.used == 0 ? -1 : 63 - __clzll(static_cast<long long>(b.w.used));
  return b;
}

// out[t, step columns] = sum_j rows_buf[t k + j] over the block's tokens, j ascending, stored
// in bf16; V (4 or 8) columns per task, tasks over the threads first .. first + count - 1 only.
// The forward's 64 tokens x 4 column groups give each of its 256 threads one task (with 8
// columns a task, half the warps combined while the other half waited at the next barrier);
// the backward's dG and dU each take half of the block (bench/NOTES.md v11).
template <int V>
__device__ __forceinline__ void combine_pairs_v(const float* rows_buf, bf16* out, int64_t I,
                                                int64_t t0, int tokens, int k, int64_t c0,
                                                int64_t col_end, int first, int count) {
  static_assert(V == 4 || V == 8, "whole float4 row-buffer reads");
  constexpr int G = kMmaStep / V;
  const int me = static_cast<int>(threadIdx.x) - first;
  if (me < 0 || me >= count) return;
  for (int task = me; task < tokens * G; task += count) {
    const int t = task / G, cg = (task % G) * V;
    if (c0 + cg >= col_end) continue;  // (I % 8 == 0: a group is inside or outside whole)
    float sum[V] = {};
    for (int j = 0; j < k; ++j) {
      const float* src = rows_buf + (t * k + j) * kWhStride + cg;
#pragma unroll
      for (int v = 0; v < V; v += 4) {
        const float4 x = *reinterpret_cast<const float4*>(src + v);
        sum[v] += x.x;
        sum[v + 1] += x.y;
        sum[v + 2] += x.z;
        sum[v + 3] += x.w;
      }
    }
    bf16* dst = out + (t0 + t) * I + c0 + cg;
    if constexpr (V == 8) {
      store_acc<8>(dst, sum);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(__floats2bfloat162_rn(sum[0], sum[1])),
                                                  pack_bf16x2(__floats2bfloat162_rn(sum[2], sum[3])));
    }
  }
}

// R8: ranks up to 8 * R8 (Rg, Ru, Rd); with R8 == 2 (ranks <= 16) z stays in registers
// (RegFrags). ACT: kSilu or kAnyActivation (activation_at).
//
// One barrier per step: the step's tiles are waited for and the barrier passed before the next
// step's copies are issued (into the stage every thread has finished reading), and w * h goes
// to two row buffers in turn, so that step s combines the rows of step s - 1, complete at the
// barrier, while the warps fill the other buffer (a second barrier per step stalled ~18% of
// the time, bench/NOTES.md v4). STAGES: the layout's (mma_layout); with one stage, two barriers
// per step (begin_step).
template <int R8, int ACT, int STAGES, bool DROP>
__global__ void __launch_bounds__(kMmaThreads)
    moe_swiglu_mma_kernel(MoeSwigluParams p, MmaSmem L, int64_t tokens_per_block,
                          int64_t block_cols, float* zd_tiles) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int16_t ids_s[kMmaRows];      // by block pair
  __shared__ float weights_s[kMmaRows];    // by block pair
  __shared__ int16_t perm_s[kMmaRows];     // sorted row -> block pair (-1 past the pairs)
  const int lane = threadIdx.x % kWarpSize, c = lane % 4;
  // Two row buffers [kMmaRows, kWhStride]: w * h by pair, of even and odd steps.
  auto wh = [&](int st) { return reinterpret_cast<float*>(smem) + st * kMmaRows * kWhStride; };
  uint32_t* zg_words = reinterpret_cast<uint32_t*>(smem + L.z);  // [kMmaRows, Rg / 2] (sorted rows)
  uint32_t* zu_words = zg_words + kMmaRows * (p.Rg / 2);         // [kMmaRows, Ru / 2]
  bf16* first_stage = reinterpret_cast<bf16*>(smem + L.stage);  // (begin_step has the rest)
  const int64_t t0 = int64_t(blockIdx.x) * tokens_per_block;
  const int tokens = static_cast<int>(min(tokens_per_block, p.T - t0));
  const int64_t col_begin = int64_t(blockIdx.y) * block_cols;
  const int64_t col_end = min(p.I, col_begin + block_cols);
  const int k = static_cast<int>(p.k);
  // Without dropout the staging offsets are computed once (StagePlan); with it, per step.
  const StagePlan plan(p, L);
  auto issue = [&](bf16* stage, int64_t c) {
    if constexpr (DROP) {
      stage_step(p, nullptr, L, stage, t0, tokens, c, col_end);
    } else {
      stage_step_planned(p, nullptr, plan, L, stage, t0, tokens, c, col_end);
    }
  };
  issue(first_stage, col_begin);  // flies meanwhile
  cp_async_commit();
  const BlockRows b = setup_block(p, tokens_per_block, ids_s, weights_s, perm_s, R8 != 2, zg_words,
                                  zu_words);
  const WarpRows& w = b.w;
  if constexpr (R8 != 2) __syncthreads();  // the z words of every row
  const auto zg = z_frags<R8 == 2>(w, static_cast<const float*>(p.zg), b.q0,
                                   SmemFrags{zg_words, static_cast<int>(p.Rg)});
  const auto zu = z_frags<R8 == 2>(w, static_cast<const float*>(p.zu), b.q0,
                                   SmemFrags{zu_words, static_cast<int>(p.Ru)});

  const float s = static_cast<float>(p.scale);
  const DropoutScale<float> drop(p.dropout_p, p.key);
  float zacc[2][R8][2] = {};  // zd[pair[half], 8 rb + 2 c + v] over this block's columns
  int st = 0;
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kMmaStep, st ^= 1) {
    const bf16* S = begin_step<STAGES>(L, smem, st, c0, col_begin, col_end, issue);
    if (c0 > col_begin) {  // step c0 - 16's rows are complete
      combine_pairs_v<4>(wh(st ^ 1), static_cast<bf16*>(p.hbar), p.I, t0, tokens, k, c0 - kMmaStep,
                         col_end, 0, kMmaThreads);
    }
    float* wh_st = wh(st);

    float dgl[kMmaStep / 8][4] = {}, dul[kMmaStep / 8][4] = {};  // delta_g, delta_u
    lora_deltas<R8>(p, w, zg, zu, S, L, dgl, dul);

    // g, u, h at the accumulator positions (rows row[half], step columns 8 nt + 2 c + v);
    // drop(h) straight into the zd MMA's A fragment (regs: (row0, k) (row1, k) (row0, k + 8)
    // (row1, k + 8), k = 2 c: n-tile 0 is k 0..7, n-tile 1 is k 8..15).
    uint32_t hb[4];
#pragma unroll
    for (int nt = 0; nt < kMmaStep / 8; ++nt) {
      const int col = nt * 8 + 2 * c;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float h[2] = {0.f, 0.f}, hd[2] = {0.f, 0.f};
        if constexpr (!DROP) {
          // Without dropout, no branch: a row past the block's pairs reads token 0 and writes
          // its own row of the buffer (b.slot[half]: rows >= the block's pairs, which
          // combine_pairs never reads; its zd rows are discarded), and columns past col_end
          // were staged as zeros (G = U = 0, B = 0), so h = act(0) * 0 = 0 there.
          const int at = b.tok[half] * kColStride + col;
          const float2 Gv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.g + at));
          const float2 Uv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.u + at));
          const float Gs[2] = {Gv.x, Gv.y}, Us[2] = {Uv.x, Uv.y};
#pragma unroll
          for (int v = 0; v < 2; ++v) {
            const float gv = p.Bg != nullptr ? Gs[v] + s * dgl[nt][2 * half + v] : Gs[v];
            const float uv = p.Bu != nullptr ? Us[v] + s * dul[nt][2 * half + v] : Us[v];
            h[v] = hd[v] = activation_at<ACT>(p.activation, gv).a * uv;
          }
          *reinterpret_cast<float2*>(wh_st + b.slot[half] * kWhStride + col) =
              make_float2(b.weight[half] * h[0], b.weight[half] * h[1]);
        } else if (w.pair[half] >= 0 && c0 + col < col_end) {  // I % 8 == 0: col + 1 is inside too
          const int at = b.tok[half] * kColStride + col;
          const float2 Gv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.g + at));
          const float2 Uv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.u + at));
          const float Gs[2] = {Gv.x, Gv.y}, Us[2] = {Uv.x, Uv.y};
#pragma unroll
          for (int v = 0; v < 2; ++v) {
            const float gv = p.Bg != nullptr ? Gs[v] + s * dgl[nt][2 * half + v] : Gs[v];
            const float uv = p.Bu != nullptr ? Us[v] + s * dul[nt][2 * half + v] : Us[v];
            h[v] = activation_at<ACT>(p.activation, gv).a * uv;
            hd[v] = drop.active ? drop.factor(b.drop_base[half] + c0 + col + v) * h[v] : h[v];
          }
          *reinterpret_cast<float2*>(wh_st + w.pair[half] * kWhStride + col) =
              make_float2(b.weight[half] * h[0], b.weight[half] * h[1]);
        }
        hb[nt * 2 + half] = pack_bf16x2(__floats2bfloat162_rn(hd[0], hd[1]));
      }
    }
    // zd: Ad [E, Rd, step columns] staged: rows (e, rank) = the n index, k (step column)
    // contiguous; ldmatrix matrices (n 8 rb + 0..7, k 0-7) (.., k 8-15) (n 8 rb + 8..15, ..).
    if (p.Ad != nullptr) {
      const int Rd = static_cast<int>(p.Rd);
      auto ad_frag = [&](int e, int rb, uint32_t (&bf)[4]) {
        const int n = min(rb * 8 + (lane / 16) * 8 + lane % 8, Rd - 1);  // (ranks >= Rd unused)
        ldmatrix_x4(bf, S + L.ad + (e * Rd + n) * kColStride + (lane / 8 % 2) * 8);
      };
      if constexpr (R8 == 2) {
        pair_sums16(w, hb, ad_frag, zacc);
      } else {
        pair_sums<R8>(w, hb, Rd, ad_frag, zacc);
      }
    }
  }
  __syncthreads();  // the last step's rows
  if (col_begin < col_end) {
    const int64_t last = col_begin + (col_end - col_begin - 1) / kMmaStep * kMmaStep;
    combine_pairs_v<4>(wh(st ^ 1), static_cast<bf16*>(p.hbar), p.I, t0, tokens, k, last, col_end, 0,
                       kMmaThreads);
  }

  if (p.Ad != nullptr) {
    const int64_t N = p.T * p.k;
    float* dst = zd_tiles + int64_t(blockIdx.y) * N * p.Rd;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (w.pair[half] < 0) continue;
      const int64_t q = b.q0 + w.pair[half];
#pragma unroll
      for (int rb = 0; rb < R8; ++rb) {
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
// [rows, step columns] (grad_zd rounded to bf16), dh, dg, du in the accumulator layout, dG and
// dU through shared memory for the combine over j, and the per-pair sums over the block's
// columns: dweights (each thread its own, then its quad in a fixed butterfly) and dzg / s,
// dzu / s (MMAs of dg, du rounded to bf16, with the staged Bg, Bu, accumulated in the MMAs'
// fp32 accumulators). The sums
// go to sums: [gridDim.y column tiles, N, 1 + Rg + Ru] partials, or with one column tile
// straight to the outputs (scaled). R8: ranks up to 8 * R8 (Rg, Ru, Rd; rank blocks of 8 per
// thread for dzg and dzu); with R8 == 2, z stays in registers (RegFrags). ACT: as in the forward.
//
// Ranks above 16 (R8 > 2) leave one block per SM (shared memory, bench/NOTES.md v5), so the
// register limit is that of one block: no spills.
template <int R8, int ACT, int STAGES, bool DROP>
__global__ void __launch_bounds__(kMmaThreads, R8 == 2 ? 2 : 1)
    moe_swiglu_bwd_mma_kernel(MoeSwigluBackwardParams p, MmaSmem L, int64_t tokens_per_block,
                              int64_t block_cols, float* sums) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int16_t ids_s[kMmaRows];
  __shared__ float weights_s[kMmaRows];
  __shared__ int16_t perm_s[kMmaRows];
  const int lane = threadIdx.x % kWarpSize, c = lane % 4;
  const bool has_gzd = p.grad_zd != nullptr && p.Ad != nullptr;
  const int Rd = has_gzd ? static_cast<int>(p.Rd) : 0;
  // Row buffers [kMmaRows, kWhStride] by pair: dg and du of even and odd steps.
  auto dg_buf = [&](int st) { return reinterpret_cast<float*>(smem) + 2 * st * kMmaRows * kWhStride; };
  auto du_buf = [&](int st) { return dg_buf(st) + kMmaRows * kWhStride; };
  uint32_t* zg_words = reinterpret_cast<uint32_t*>(smem + L.z);
  uint32_t* zu_words = zg_words + kMmaRows * (p.Rg / 2);
  uint32_t* gz_words = reinterpret_cast<uint32_t*>(smem + L.gz);  // [kMmaRows, Rd / 2] by sorted row
  const bf16* grad_hbar = static_cast<const bf16*>(p.grad_hbar);
  bf16* first_stage = reinterpret_cast<bf16*>(smem + L.stage);  // (begin_step has the rest)
  const int64_t t0 = int64_t(blockIdx.x) * tokens_per_block;
  const int tokens = static_cast<int>(min(tokens_per_block, p.T - t0));
  const int64_t col_begin = int64_t(blockIdx.y) * block_cols;
  const int64_t col_end = min(p.I, col_begin + block_cols);
  // As in the forward: without dropout the staging offsets are computed once (StagePlan).
  const StagePlan plan(p, L);
  auto issue = [&](bf16* stage, int64_t c) {
    if constexpr (DROP) {
      stage_step(p, grad_hbar, L, stage, t0, tokens, c, col_end);
    } else {
      stage_step_planned(p, grad_hbar, plan, L, stage, t0, tokens, c, col_end);
    }
  };
  issue(first_stage, col_begin);  // flies meanwhile
  cp_async_commit();
  const BlockRows b = setup_block(p, tokens_per_block, ids_s, weights_s, perm_s, R8 != 2, zg_words,
                                  zu_words);
  const WarpRows& w = b.w;
  const int k = static_cast<int>(p.k);
  if (has_gzd) {  // grad_zd as bf16 words by sorted row
    const float* gzd = static_cast<const float*>(p.grad_zd);
    for (int i = threadIdx.x; i < b.rows * (Rd / 2); i += kMmaThreads) {
      const int row = i / (Rd / 2), kp = i % (Rd / 2);
      const float* src = gzd + (b.q0 + perm_s[row]) * Rd + 2 * kp;
      gz_words[i] = pack_bf16x2(__floats2bfloat162_rn(src[0], src[1]));
    }
  }
  __syncthreads();  // the z and grad_zd words of every row
  const auto zg = z_frags<R8 == 2>(w, static_cast<const float*>(p.zg), b.q0,
                                   SmemFrags{zg_words, static_cast<int>(p.Rg)});
  const auto zu = z_frags<R8 == 2>(w, static_cast<const float*>(p.zu), b.q0,
                                   SmemFrags{zu_words, static_cast<int>(p.Ru)});
  // (grad_zd's words stay in shared memory: in registers too, the kernel spilled.)
  const SmemFrags gz{gz_words, Rd};

  const float s = static_cast<float>(p.scale);
  const DropoutScale<float> drop(p.dropout_p, p.key);
  float dw[2] = {0.f, 0.f};         // dweights[pair[half]] over this thread's columns
  float zg_acc[2][R8][2] = {};      // dzg / s and dzu / s [pair[half], 8 rb + 2 c + v]
  float zu_acc[2][R8][2] = {};
  int st = 0;
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kMmaStep, st ^= 1) {
    // As in the forward: dg and du rows of step c0 - 16 are combined while this step fills
    // the other pair of row buffers.
    const bf16* S = begin_step<STAGES>(L, smem, st, c0, col_begin, col_end, issue);
    if (c0 > col_begin) {
      combine_pairs_v<8>(dg_buf(st ^ 1), static_cast<bf16*>(p.dG), p.I, t0, tokens, k, c0 - kMmaStep,
                         col_end, 0, kMmaThreads / 2);
      combine_pairs_v<8>(du_buf(st ^ 1), static_cast<bf16*>(p.dU), p.I, t0, tokens, k, c0 - kMmaStep,
                         col_end, kMmaThreads / 2, kMmaThreads / 2);
    }
    float* dg_st = dg_buf(st);
    float* du_st = du_buf(st);

    float dgl[kMmaStep / 8][4] = {}, dul[kMmaStep / 8][4] = {}, adz[kMmaStep / 8][4] = {};
    lora_deltas<R8>(p, w, zg, zu, S, L, dgl, dul);
    if (has_gzd) {  // adz[row, col] = sum_r grad_zd[row, r] * Ad[e(row), r, col]
      // Ad staged [E, Rd, step columns]: k (rank) rows, n (column) contiguous, so transposed
      // ldmatrix: matrices (k0 + 0..7, n 0-7) (k0 + 8..15, n 0-7) (.., n 8-15) (..).
      masked_mma(w, gz, Rd, [&](int e, int k0, uint32_t (&bf)[4]) {
        const int kr = min(k0 + (lane / 8 % 2) * 8 + lane % 8, Rd - 1);  // (zeroed below)
        ldmatrix_x4<true>(bf, S + L.ad + (e * Rd + kr) * kColStride + (lane / 16) * 8);
        if (k0 + 2 * c >= Rd) bf[0] = bf[2] = 0u;
        if (k0 + 8 + 2 * c >= Rd) bf[1] = bf[3] = 0u;
      }, adz);
    }

    // dh, dg, du at the accumulator positions; dg, du to the row buffers and, rounded to bf16,
    // to the A fragments of the dzg / dzu MMAs.
    uint32_t gb[4], ub[4];
#pragma unroll
    for (int nt = 0; nt < kMmaStep / 8; ++nt) {
      const int col = nt * 8 + 2 * c;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float dgv[2] = {0.f, 0.f}, duv[2] = {0.f, 0.f};
        // Without dropout, no branch (as in the forward): rows past the pairs work on token 0
        // into their own rows of the buffers (slot), columns past col_end are zeros.
        if (!DROP || (w.pair[half] >= 0 && c0 + col < col_end)) {
          const int at = b.tok[half] * kColStride + col;
          const float2 Gv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.g + at));
          const float2 Uv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.u + at));
          const float2 Hv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(S + L.gh + at));
          const float Gs[2] = {Gv.x, Gv.y}, Us[2] = {Uv.x, Uv.y}, gh[2] = {Hv.x, Hv.y};
#pragma unroll
          for (int v = 0; v < 2; ++v) {
            const float gv = p.Bg != nullptr ? Gs[v] + s * dgl[nt][2 * half + v] : Gs[v];
            const float uv = p.Bu != nullptr ? Us[v] + s * dul[nt][2 * half + v] : Us[v];
            const ActValue<float> act = activation_at<ACT>(p.activation, gv);
            float dh = b.weight[half] * gh[v];
            if (has_gzd) {
              if constexpr (DROP) {
                const float m = drop.active ? drop.factor(b.drop_base[half] + c0 + col + v) : 1.f;
                dh += m * adz[nt][2 * half + v];
              } else {
                dh += adz[nt][2 * half + v];
              }
            }
            dw[half] += gh[v] * (act.a * uv);
            dgv[v] = dh * uv * act.da;  // (swiglu_point_grad)
            duv[v] = dh * act.a;
          }
          const int row = DROP ? w.pair[half] : b.slot[half];
          *reinterpret_cast<float2*>(dg_st + row * kWhStride + col) = make_float2(dgv[0], dgv[1]);
          *reinterpret_cast<float2*>(du_st + row * kWhStride + col) = make_float2(duv[0], duv[1]);
        }
        gb[nt * 2 + half] = pack_bf16x2(__floats2bfloat162_rn(dgv[0], dgv[1]));
        ub[nt * 2 + half] = pack_bf16x2(__floats2bfloat162_rn(duv[0], duv[1]));
      }
    }
    // dzg / s, dzu / s: Bg, Bu staged as [E, step columns, R + kPad]: k (column) rows, n (rank)
    // contiguous, so transposed ldmatrix: matrices (k 0-7, n 8 rb + 0..7) (k 8-15, ..)
    // (k 0-7, n 8 rb + 8..15) (..) (n past R reads the rows' padding: those sums are unused).
    auto weight_frag = [&](const bf16* B_s, int R) {
      return [=](int e, int rb, uint32_t (&bf)[4]) {
        const int kc = (lane / 8 % 2) * 8 + lane % 8;
        ldmatrix_x4<true>(bf, B_s + (e * kMmaStep + kc) * (R + kPad) + rb * 8 + (lane / 16) * 8);
      };
    };
    if (p.Bg != nullptr) {
      const int Rg = static_cast<int>(p.Rg);
      if constexpr (R8 == 2) {
        pair_sums16(w, gb, weight_frag(S + L.bg, Rg), zg_acc);
      } else {
        pair_sums<R8>(w, gb, Rg, weight_frag(S + L.bg, Rg), zg_acc);
      }
    }
    if (p.Bu != nullptr) {
      const int Ru = static_cast<int>(p.Ru);
      if constexpr (R8 == 2) {
        pair_sums16(w, ub, weight_frag(S + L.bu, Ru), zu_acc);
      } else {
        pair_sums<R8>(w, ub, Ru, weight_frag(S + L.bu, Ru), zu_acc);
      }
    }
  }
  __syncthreads();  // the last step's rows
  if (col_begin < col_end) {
    const int64_t last = col_begin + (col_end - col_begin - 1) / kMmaStep * kMmaStep;
    combine_pairs_v<8>(dg_buf(st ^ 1), static_cast<bf16*>(p.dG), p.I, t0, tokens, k, last, col_end, 0,
                       kMmaThreads / 2);
    combine_pairs_v<8>(du_buf(st ^ 1), static_cast<bf16*>(p.dU), p.I, t0, tokens, k, last, col_end,
                       kMmaThreads / 2, kMmaThreads / 2);
  }

  // dweights: the quad's four lanes hold the row's column shares (fixed butterfly).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    dw[half] += __shfl_xor_sync(kFullMask, dw[half], 1);
    dw[half] += __shfl_xor_sync(kFullMask, dw[half], 2);
  }
  const int64_t N = p.T * p.k, total = 1 + p.Rg + p.Ru;
  const bool final = gridDim.y == 1;
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

}  // namespace

bool mma_forward_supported(const MoeSwigluParams& p) {
  if (p.dtype != DType::kBFloat16) return false;
  if (p.E < 1 || p.E > kMmaMaxExperts || p.k < 1 || p.k > kMmaRows) return false;
  if (p.T * p.k < kMmaMinPairs) return false;
  if (p.I % 8 != 0) return false;  // whole 16-byte chunks of every staged row, hbar stores
  if (std::max({p.Rg, p.Ru, p.Rd}) > kMmaMaxRank) return false;
  // stage_step's 32-bit offsets: a block's G / U rows, an expert's weights (and all of them).
  constexpr int64_t kMaxOffset = int64_t(1) << 31;
  if (kMmaRows * p.I >= kMaxOffset || p.E * p.I * std::max({p.Rg, p.Ru, p.Rd}) >= kMaxOffset) return false;
  // Bg / Bu rows of R ranks in R / 8 16-byte chunks, a power of two (stage_step).
  for (const int64_t R : {p.Rg, p.Ru}) {
    if (R % 8 != 0 || ((R / 8) & (R / 8 - 1)) != 0) return false;
  }
  const void* rows[] = {p.G, p.U, p.hbar, p.Bg, p.Bu, p.Ad};  // copied in 16-byte chunks
  for (const void* ptr : rows) {
    if (!aligned16(ptr)) return false;  // (null is aligned)
  }
  if (!device_has_mma()) return false;
  return mma_layout(p, false).stages > 0;  // not with many experts and ranks
}

bool mma_backward_supported(const MoeSwigluBackwardParams& p) {
  MoeSwigluParams as_forward{};
  static_cast<SwigluInputs&>(as_forward) = p;
  as_forward.hbar = p.dG;  // (dG, dU, grad_hbar: stored and staged like hbar, G, U)
  if (!mma_forward_supported(as_forward)) return false;
  if (!aligned16(p.dU) || !aligned16(p.grad_hbar)) return false;
  if (p.Rd % 2 != 0) return false;  // grad_zd as words of rank pairs
  return mma_layout(p, true).stages > 0;
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

// f(R8, ACT) (std::integral_constant) for the kernel instance of p's ranks and activation.
template <typename F>
cudaError_t by_rank_and_activation(const SwigluInputs& p, F&& f) {
  using std::integral_constant;
  const bool small = std::max({p.Rg, p.Ru, p.Rd}) <= 16;
  if (p.activation == kSilu) {
    return small ? f(integral_constant<int, 2>{}, integral_constant<int, kSilu>{})
                 : f(integral_constant<int, kMmaMaxRank / 8>{}, integral_constant<int, kSilu>{});
  }
  return small ? f(integral_constant<int, 2>{}, integral_constant<int, kAnyActivation>{})
               : f(integral_constant<int, kMmaMaxRank / 8>{}, integral_constant<int, kAnyActivation>{});
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
  const MmaSmem layout = mma_layout(p, false);
  if (layout.stages == 0) return cudaErrorInvalidConfiguration;  // (mma_forward_supported)
  const size_t smem = static_cast<size_t>(layout.total);
  auto launch = [&](auto kernel) {
    const cudaError_t err = allow_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kMmaThreads, smem, stream>>>(p, layout, tokens_per_block, block_cols, zd_tiles);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  };
  auto by_stages = [&](auto r8, auto act) {
    constexpr int R8 = decltype(r8)::value, ACT = decltype(act)::value;
    if (p.dropout_p > 0) {
      return layout.stages == 1 ? launch(moe_swiglu_mma_kernel<R8, ACT, 1, true>)
                                : launch(moe_swiglu_mma_kernel<R8, ACT, 2, true>);
    }
    return layout.stages == 1 ? launch(moe_swiglu_mma_kernel<R8, ACT, 1, false>)
                              : launch(moe_swiglu_mma_kernel<R8, ACT, 2, false>);
  };
  return by_rank_and_activation(p, by_stages);
}

cudaError_t launch_moe_swiglu_bwd_mma(const MoeSwigluBackwardParams& p, float* sums,
                                      cudaStream_t stream) {
  const int64_t tokens_per_block = kMmaRows / p.k;
  const dim3 grid(static_cast<unsigned>((p.T + tokens_per_block - 1) / tokens_per_block),
                  static_cast<unsigned>(mma_column_tiles(p.T, p.k, p.I)));
  const int64_t block_cols = mma_block_cols(p.T, p.k, p.I);
  const MmaSmem layout = mma_layout(p, true);
  if (layout.stages == 0) return cudaErrorInvalidConfiguration;  // (mma_backward_supported)
  const size_t smem = static_cast<size_t>(layout.total);
  auto launch = [&](auto kernel) {
    const cudaError_t err = allow_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kMmaThreads, smem, stream>>>(p, layout, tokens_per_block, block_cols, sums);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  };
  auto by_stages = [&](auto r8, auto act) {
    constexpr int R8 = decltype(r8)::value, ACT = decltype(act)::value;
    if (p.dropout_p > 0) {
      return layout.stages == 1 ? launch(moe_swiglu_bwd_mma_kernel<R8, ACT, 1, true>)
                                : launch(moe_swiglu_bwd_mma_kernel<R8, ACT, 2, true>);
    }
    return layout.stages == 1 ? launch(moe_swiglu_bwd_mma_kernel<R8, ACT, 1, false>)
                              : launch(moe_swiglu_bwd_mma_kernel<R8, ACT, 2, false>);
  };
  return by_rank_and_activation(p, by_stages);
}

}  // namespace cuda
}  // namespace mixlora
