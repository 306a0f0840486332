// v19 (bench/NOTES.md): the backward's pass 1 of the MoE SwiGLU in the epilogue of our own Hopper
// dhbar GEMM, the fused-GEMM route's step for the forward + backward target. Bench code, not a
// path of the library: v18's GEMM (bench/fused_gu_wgmma_proto.cu, tiles of 64 tokens, each
// pair's deltas in sums of their own) with another epilogue; `bench/fused_bwd_wgmma_proto.py`
// checks it against the fp32 reference and times it beside cuBLAS.
//
// For E = 8 experts of rank R = 16, k = 2 pairs a token, bf16, SiLU, no dropout, it computes for a
// token with experts e_j and weights w_j (s the LoRA scale, folded into zg and zu by the caller):
//   dhbar = bf16(dout Wd)                             (the GEMM, fp32 sums; Wd^T as wdt [I, H])
//   g_j = G + zg_j Bg[e_j]^T,  u_j = U + zu_j Bu[e_j]^T,  dh_j = w_j dhbar + gzd_j Ad[e_j]
//   dg_j = dh_j u_j silu'(g_j),  du_j = dh_j silu(g_j),  h_j = silu(g_j) u_j
//   dG = dg_0 + dg_1, dU = du_0 + du_1                 [T, I] bf16 (the dx GEMM's inputs)
//   dz_j = [bf16(dg_j) Bg[e_j] | bf16(du_j) Bu[e_j]]   [P, T, 2, 2 R] fp32 partials (x s: caller)
//   dw_j = sum_i dhbar h_j                             [P, T, 2] fp32 partials
// the library's pass 1 (csrc/swiglu/swiglu_cpu.cpp, moe_swiglu_backward) with grad_hbar the
// GEMM's sums rounded to bf16 as the library's GEMM writes them; dhbar is also an output (pass
// 2, the weight gradients, reads it), so the pass costs no round trip of its own.
//
// The GEMM: persistent CTAs, items of (a block of 64 tokens, a chunk of I's 128-column tiles),
// as v18; a tile is 64 tokens x 128 columns of dhbar (one m64n128 accumulator a consumer
// thread). Warpgroup 0 produces: its warp 0 the stages (4 of dout 64 x 64 and wdt 128 x 64,
// 24 KiB), its warp 1 the epilogue operands, 80 KiB a 64-column sub-block of the tile: Bgu (the
// forward's [Bg | Bu] interleave, 128 rows x E R), adt (Ad^T [64 columns, E R]) and bgut (Bg^T
// and Bu^T, [E R rows, 64 columns] each). Two producer threads, so that the second sub-block's
// operands, which wait for the first's epilogue, never hold up the stages of the other consumer's
// main loop. Consumer warpgroups 1 and 2 take the CTA's tiles in turn (v16's ping-pong).
//
// The epilogue. After the main loop the consumer stores dhbar (bf16) and reads it back per
// quarter: the tile's first K step writes the accumulators without reading them
// (wgmma_m64n128k16_first), so they are dead from the store to the next tile and their 64
// registers serve the epilogue (v18 kept them live and had room; v19's epilogue does not fit
// beside them: NOTES v19). Per 32-column quarter (two of each sub-block) and pair j, all products
// on tensor cores with A from registers, masked per expert (a row keeps its expert's 16 K
// columns), G, U and dhbar read from memory (L1, the next quarter's prefetched):
//   1. g, u, dh started as G, U, w_j dhbar in fp32 sums, onto which 8 experts x 3 m64n32k16 add
//      zg_j Bg^T, zu_j Bu^T (Bgu's G rows, U rows) and gzd_j Ad (adt);
//   2. dg, du, h, the sums dG, dU (fp32, over the pairs) and dw; bf16(dg), bf16(du) kept as the
//      A fragments of
//   3. dz_j += bf16(dg) Bg, bf16(du) Bu (4 expert pairs x 2 K steps of m64n32k16 each, a row
//      keeping its expert's ranks), added to the warpgroup's sums in shared memory.
// Then dG, dU stored as bf16. The pairs and quarters are loops, not unrolled, and the masks'
// selects asm volatile: unrolled or plain, the compiler interleaved them and ran out of
// registers (C7512, KiBs of spills; NOTES v19). The epilogue's MMAs are ~31% of the tile's
// main loop at H = 4096 (per 64 columns and pair 40 m64n32k16 against 256 m64n64k16).
// Barriers: stage full / empty, the epilogue buffer's full (one per sub-block) and empty, the
// turn pair. A warpgroup hands the turn over after it has waited for its first sub-block's
// operands: so the other never waits on a "full" barrier whose previous phase is still open (the
// second sub-block's barrier completes its phase before the next tile's first sub-block can fill,
// which holds because both sub-blocks share the one buffer and its one "empty" barrier: with a
// buffer a sub-block, the second's wait would need the turn to follow it; one "full" barrier for
// both sub-blocks aliases phases. bench/wgmma_protocol_sim.py, variant 5, with those faults).
// Shapes: T % 64 == 0, H % 64 == 0, I % 128 == 0, 16-byte aligned rows (the launcher checks).
#include "moe_epilogue.cuh"

// Measurement only (bench/v19_ablate.py): 1 leaves the epilogue out (the GEMM and the dhbar
// store), 2 the dz products, 3 the masked delta MMAs; 0 (the default) is the kernel.
#ifndef V19_ABLATE
#define V19_ABLATE 0
#endif

namespace {

constexpr int kTM = 64;    // tokens a tile
constexpr int kTN = 128;   // columns of dhbar a tile
constexpr int kSub = 64;   // columns whose epilogue operands fill the buffer once
constexpr int kThreads = 384;
constexpr int kStages = 4;
constexpr int kABytes = kTM * kRowBytes;                // 8 KiB
constexpr int kStageBytes = kABytes + kTN * kRowBytes;  // 24 KiB
constexpr int kBox128 = 128 * kRowBytes, kBox64 = 64 * kRowBytes;  // 16 / 8 KiB
// the epilogue buffer: Bgu (2 boxes: K 0-63, 64-127), adt (2 boxes), Bg^T, Bu^T
constexpr int kEpiAdt = 2 * kBox128, kEpiBgut = kEpiAdt + 2 * kBox64;
constexpr int kEpiBytes = kEpiBgut + 2 * kBox128;  // 80 KiB
// dz sums of a consumer warpgroup's rows over the item's tiles (fp32, [row][pair][g | u][rank],
// rows padded by 4 words against bank conflicts)
constexpr int kDzRowWords = kPairs * 2 * kRank + 4;
constexpr int kDzBytes = kTM * kDzRowWords * 4;  // 17 KiB
constexpr int kBarriers = 2 * kStages + 2 + 1 + 2;  // stage full / empty, epi full x 2, empty, turn
constexpr int kSmemBytes = 1024 + kStages * kStageBytes + kEpiBytes + 2 * kDzBytes + kBarriers * 8;
static_assert(kSmemBytes <= 227 * 1024, "shared memory");
static_assert(kTN == 2 * kSub, "a tile is two sub-blocks (the consumer's epilogue is written so)");
static_assert(kER == 2 * kBK, "Bgu's and adt's K (E R) is two 64-column boxes");

#ifdef MIXLORA_PROTO_SM90A

// A word this thread stored earlier in the kernel (dhbar): a plain, coherent load (not the
// read-only path), asm volatile so that the compiler does not keep the stored value instead.
__device__ __forceinline__ uint32_t load_own(const __nv_bfloat16* p) {
  uint32_t v;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A consumer's K step `it` (the CTA's count) of its tile: the stage's MMAs issued, the previous
// stage released once its MMAs have completed (one group stays in flight).
template <bool FIRST>
__device__ __forceinline__ void main_step(float (&d)[64], uint32_t base, uint32_t full0,
                                          uint32_t empty0, int it, int& previous, int lane) {
  const int s = it % kStages;
  mbar_wait(full0 + 8 * s, static_cast<uint32_t>(it / kStages) & 1u);
  const uint32_t sa = base + s * kStageBytes;
  const uint64_t desc_a = sw128_desc(sa), desc_b = sw128_desc(sa + kABytes);
  if constexpr (FIRST) {
    wgmma_fence();
    wgmma_m64n128k16_first(d, desc_a, desc_b);
  } else {
    fence_operands(d);
    wgmma_fence();
    wgmma_m64n128k16(d, desc_a, desc_b, 1u);
  }
#pragma unroll
  for (int k = 1; k < kBK / 16; ++k) wgmma_m64n128k16(d, desc_a + 2 * k, desc_b + 2 * k, 1u);
  wgmma_commit();
  wgmma_wait<1>();
  fence_operands(d);
  if (previous >= 0 && lane == 0) mbar_arrive(empty0 + 8 * previous);
  previous = s;
}

// Producer warp 0's thread: each tile's K steps into the stages.
__device__ __forceinline__ void produce_stages(const CUtensorMap* map_dout, const CUtensorMap* map_wdt,
                                               uint32_t base, uint32_t full0, uint32_t empty0,
                                               const Plan& plan, int k_steps) {
  int it = 0;
  for (int item = static_cast<int>(blockIdx.x); item < plan.items; item += static_cast<int>(gridDim.x)) {
    const int m0 = (item % plan.m_blocks) * kTM, chunk = item / plan.m_blocks;
    const int nt1 = min(plan.n_tiles, (chunk + 1) * plan.tiles_per_chunk);
    for (int nt = chunk * plan.tiles_per_chunk; nt < nt1; ++nt) {
      for (int ks = 0; ks < k_steps; ++ks, ++it) {
        const int s = it % kStages;
        mbar_wait(empty0 + 8 * s, (static_cast<uint32_t>(it / kStages) & 1u) ^ 1u);
        mbar_expect_tx(full0 + 8 * s, kStageBytes);
        const uint32_t sa = base + s * kStageBytes;
        tma_load_2d(sa, map_dout, full0 + 8 * s, ks * kBK, m0);
        tma_load_2d(sa + kABytes, map_wdt, full0 + 8 * s, ks * kBK, nt * kTN);
      }
    }
  }
}

// Producer warp 1's thread: each tile's two sub-blocks of epilogue operands, in turn into the
// one buffer (the n-th fill waits for the (n - 1)-th's release).
__device__ __forceinline__ void produce_epilogue(const CUtensorMap* map_bgu, const CUtensorMap* map_adt,
                                                 const CUtensorMap* map_bgut, uint32_t epi,
                                                 uint32_t epi_full0, uint32_t epi_empty,
                                                 const Plan& plan) {
  int fill = 0;
  for (int item = static_cast<int>(blockIdx.x); item < plan.items; item += static_cast<int>(gridDim.x)) {
    const int chunk = item / plan.m_blocks;
    const int nt1 = min(plan.n_tiles, (chunk + 1) * plan.tiles_per_chunk);
    for (int nt = chunk * plan.tiles_per_chunk; nt < nt1; ++nt) {
#pragma unroll
      for (int c = 0; c < kTN / kSub; ++c, ++fill) {
        const uint32_t full = epi_full0 + 8 * c;
        const int n = (kTN / kSub) * nt + c;  // the sub-block's 64-column block of I
        mbar_wait(epi_empty, (static_cast<uint32_t>(fill) & 1u) ^ 1u);
        mbar_expect_tx(full, kEpiBytes);
        tma_load_2d(epi, map_bgu, full, 0, 128 * n);
        tma_load_2d(epi + kBox128, map_bgu, full, kBK, 128 * n);
        tma_load_2d(epi + kEpiAdt, map_adt, full, 0, kSub * n);
        tma_load_2d(epi + kEpiAdt + kBox64, map_adt, full, kBK, kSub * n);
        tma_load_2d(epi + kEpiBgut, map_bgut, full, kSub * n, 0);
        tma_load_2d(epi + kEpiBgut + kBox128, map_bgut, full, kSub * n, kER);
      }
    }
  }
}

// The thread's A-fragment words of pair j's z [T, 2, R] (bf16): [row][ranks 2 q, 2 q + 1 /
// 8 + 2 q, 9 + 2 q].
__device__ __forceinline__ void load_zj(uint32_t (&z)[2][2], const uint32_t* __restrict__ z32,
                                        const Rows& rw, int j) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    z[r][0] = __ldg(z32 + rw.at[r] + j * (kRank / 2));
    z[r][1] = __ldg(z32 + rw.at[r] + j * (kRank / 2) + 4);
  }
}

// a's words: z's where the row's pair-j expert is kappa, else 0. The selects are asm volatile so
// that each expert's are made just before its MMAs: as plain code the compiler computed all
// eight experts' ahead (~66 more live registers, spills and serialized wgmma; NOTES v19).
__device__ __forceinline__ void mask_a(uint32_t (&a)[4], const uint32_t (&z)[2][2], const int (&e)[2],
                                       int kappa) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "setp.eq.s32 p, %1, %2;\n"
          "selp.b32 %0, %3, 0, p;\n"
          "}\n"
          : "=r"(a[2 * half + r])
          : "r"(e[r]), "r"(kappa), "r"(z[r][half]));
    }
  }
}

// One quarter (32 columns) of a tile, both pairs. epi: the sub-block's operands; qq: the
// quarter's place in them (columns 32 qq ..). The pairs and the quarters are loops, not unrolled:
// unrolled, the compiler interleaved them and ran out of registers (NOTES v19).
__device__ __forceinline__ void epilogue_quarter(
    int qq, const Rows& rw, float (&dw)[2][kPairs], float* dz, uint32_t epi,
    const uint32_t* __restrict__ zg32, const uint32_t* __restrict__ zu32,
    const uint32_t* __restrict__ gzd32, const __nv_bfloat16* __restrict__ G,
    const __nv_bfloat16* __restrict__ U, __nv_bfloat16* __restrict__ dG,
    __nv_bfloat16* __restrict__ dU, const __nv_bfloat16* dhbar, int64_t at, int64_t next,
    int64_t ld) {
  // at: the thread's first (row, column) of the quarter, row-major with ld columns. The next
  // quarter's G, U, dhbar rows are prefetched (a quad's 64 bytes of a row are in one line)
  if (next >= 0 && (threadIdx.x & 3) == 0) {  // lane % 4 == 0
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t o = next + r * 8 * ld;
      asm volatile("prefetch.global.L1 [%0];" ::"l"(G + o));
      asm volatile("prefetch.global.L1 [%0];" ::"l"(U + o));
      asm volatile("prefetch.global.L1 [%0];" ::"l"(dhbar + o));
    }
  }
  const uint32_t g_rows = epi + 32 * qq * kRowBytes, u_rows = g_rows + 64 * kRowBytes;
  const uint32_t a_rows = epi + kEpiAdt + 32 * qq * kRowBytes;
  float sg[16] = {}, su[16] = {};  // dG, dU sums over the pairs, in the accumulator layout
#pragma unroll 1
  for (int j = 0; j < kPairs; ++j) {
    const int e[2] = {j ? rw.e[0][1] : rw.e[0][0], j ? rw.e[1][1] : rw.e[1][0]};
    const float wj[2] = {j ? rw.w[0][1] : rw.w[0][0], j ? rw.w[1][1] : rw.w[1][0]};
    float dwj[2] = {0.f, 0.f};
    // g, u and dh, started as G, U and w_j dhbar, onto which the MMAs add the LoRA terms: G
    // and U are read again for the second pair (L1), so they hold no registers across the pairs
    float dlg[16], dlu[16], ddh[16];
    uint32_t dq[8];  // dhbar, [2 b + r]: row r, columns 8 b + 2 q, +1
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t o = at + r * 8 * ld + 8 * b;
        const float2 g0 = unpack_bf16x2(__ldg(reinterpret_cast<const unsigned int*>(G + o)));
        const float2 u0 = unpack_bf16x2(__ldg(reinterpret_cast<const unsigned int*>(U + o)));
        dq[2 * b + r] = load_own(dhbar + o);
        const float2 dv = unpack_bf16x2(dq[2 * b + r]);
        const int v = 4 * b + 2 * r;
        dlg[v] = g0.x, dlg[v + 1] = g0.y, dlu[v] = u0.x, dlu[v + 1] = u0.y;
        ddh[v] = wj[r] * dv.x, ddh[v + 1] = wj[r] * dv.y;
      }
    }
    uint32_t zg[2][2], zu[2][2], zd[2][2];
    load_zj(zg, zg32, rw, j);
    load_zj(zu, zu32, rw, j);
    load_zj(zd, gzd32, rw, j);
#pragma unroll
    for (int kappa = 0; kappa < (V19_ABLATE == 3 ? 0 : kExperts); ++kappa) {
      uint32_t ag[4], au[4], az[4];
      mask_a(ag, zg, e, kappa);
      mask_a(au, zu, e, kappa);
      mask_a(az, zd, e, kappa);
      // expert kappa's K columns: box kappa / 4, 16-column step kappa % 4 (32 bytes each)
      const uint64_t step = 2 * (kappa % 4);
      const uint32_t box = (kappa / 4) * kBox128, abox = (kappa / 4) * kBox64;
      fence_operands(dlg);
      fence_operands(dlu);
      fence_operands(ddh);
      wgmma_fence();
      wgmma_m64n32k16_rs(dlg, ag, sw128_desc(g_rows + box) + step, 1u);
      wgmma_m64n32k16_rs(dlu, au, sw128_desc(u_rows + box) + step, 1u);
      wgmma_m64n32k16_rs(ddh, az, sw128_desc(a_rows + abox) + step, 1u);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(dlg);
      fence_operands(dlu);
      fence_operands(ddh);
    }
    uint32_t fg[8], fu[8];  // bf16(dg), bf16(du): [2 b + r], the A fragments of the dz products
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float dg[2], du[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int v = 4 * b + 2 * r + c;  // the quarter's accumulator index
          const float2 dv2 = unpack_bf16x2(dq[2 * b + r]);
          const float dv = c ? dv2.y : dv2.x;
          const float g = dlg[v], u = dlu[v], dhj = ddh[v];
          const auto act = mixlora::cuda::activation_at<mixlora::kSilu, float>(mixlora::kSilu, g);
          dg[c] = dhj * u * act.da;
          du[c] = dhj * act.a;
          dwj[r] = fmaf(dv, act.a * u, dwj[r]);
          sg[v] += dg[c];
          su[v] += du[c];
        }
        fg[2 * b + r] = bf16x2(dg[0], dg[1]);
        fu[2 * b + r] = bf16x2(du[0], du[1]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dw[r][0] += j ? 0.f : dwj[r];
      dw[r][1] += j ? dwj[r] : 0.f;
    }
    if (V19_ABLATE != 2) {
      add_rank_sums<2, kDzRowWords>(dz + j * 2 * kRank, fg, e, epi + kEpiBgut, 2 * qq);
      add_rank_sums<2, kDzRowWords>(dz + j * 2 * kRank + kRank, fu, e, epi + kEpiBgut + kBox128, 2 * qq);
    } else if (fg[0] == 0xffffffffu && fu[0] == 0xffffffffu) {
      dz[0] = 1.f;  // (keeps dg, du computed)
    }
  }
#pragma unroll
  for (int b = 0; b < 4; ++b) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int v = 4 * b + 2 * r;
      const int64_t o = at + r * 8 * ld + 8 * b;
      *reinterpret_cast<uint32_t*>(dG + o) = bf16x2(sg[v], sg[v + 1]);
      *reinterpret_cast<uint32_t*>(dU + o) = bf16x2(su[v], su[v + 1]);
    }
  }
}

#endif  // sm_90a

__global__ void __launch_bounds__(kThreads, 1)
    fused_bwd_kernel(const __grid_constant__ CUtensorMap map_dout,
                     const __grid_constant__ CUtensorMap map_wdt,
                     const __grid_constant__ CUtensorMap map_bgu,
                     const __grid_constant__ CUtensorMap map_adt,
                     const __grid_constant__ CUtensorMap map_bgut,
                     const __nv_bfloat16* __restrict__ G, const __nv_bfloat16* __restrict__ U,
                     const __nv_bfloat16* __restrict__ zg, const __nv_bfloat16* __restrict__ zu,
                     const __nv_bfloat16* __restrict__ gzd, const int* __restrict__ ids,
                     const float* __restrict__ w, __nv_bfloat16* __restrict__ dG,
                     __nv_bfloat16* __restrict__ dU, __nv_bfloat16* __restrict__ dhbar,
                     float* __restrict__ dz_part, float* __restrict__ dw_part, int T, int H, int I,
                     int plan_ctas) {
#ifdef MIXLORA_PROTO_SM90A
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t epi = base + kStages * kStageBytes;
  const uint32_t dz_buf = epi + kEpiBytes;  // the two consumer warpgroups' dz sums
  const uint32_t full0 = dz_buf + 2 * kDzBytes, empty0 = full0 + 8 * kStages;
  const uint32_t epi_full0 = empty0 + 8 * kStages;  // one a sub-block
  const uint32_t epi_empty = epi_full0 + 8 * (kTN / kSub);
  const uint32_t turn0 = epi_empty + 8;  // turn[w] at turn0 + 8 w
  const int wg = static_cast<int>(threadIdx.x) / 128, tid = static_cast<int>(threadIdx.x) % 128;
  const Plan plan = make_plan(T, I, plan_ctas, kTM, kTN);  // the launcher's (gridDim.x may be fewer)
  const int k_steps = H / kBK;
  if (threadIdx.x == 0) {
    init_stage_barriers(full0, empty0, kStages, 4);
    for (int c = 0; c < kTN / kSub; ++c) mbar_init(epi_full0 + 8 * c, 1);
    mbar_init(epi_empty, 4);
    mbar_init(turn0, 4);
    mbar_init(turn0 + 8, 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (wg == 0) {  // the producers
    // 40: the consumers' 2 x (232 - 168) registers a thread slot must come from the producers'
    // 168 - 40 (with 48 the consumers' setmaxnreg.inc waited for ever on the GPU: NOTES v19)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid == 0) produce_stages(&map_dout, &map_wdt, base, full0, empty0, plan, k_steps);
    if (tid == 32) produce_epilogue(&map_bgu, &map_adt, &map_bgut, epi, epi_full0, epi_empty, plan);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  const int own = wg - 1;  // this warpgroup's tiles: the CTA's i-th with i % 2 == own
  const int warp = tid / 32, lane = tid % 32, q = lane % 4;
  float* dz_mine = reinterpret_cast<float*>(smem_raw + (dz_buf - smem_u32(smem_raw))) +
                   own * (kDzBytes / 4) + (warp * 16 + lane / 4) * kDzRowWords + 2 * q;
  const uint32_t* zg32 = reinterpret_cast<const uint32_t*>(zg);
  const uint32_t* zu32 = reinterpret_cast<const uint32_t*>(zu);
  const uint32_t* gzd32 = reinterpret_cast<const uint32_t*>(gzd);
  float d[64];
#pragma unroll
  for (int v = 0; v < 64; ++v) d[v] = 0.f;
  int i = 0, turns = 0;
  for (int item = static_cast<int>(blockIdx.x); item < plan.items; item += static_cast<int>(gridDim.x)) {
    const int m0 = (item % plan.m_blocks) * kTM, chunk = item / plan.m_blocks;
    const int nt1 = min(plan.n_tiles, (chunk + 1) * plan.tiles_per_chunk);
    const int row = m0 + warp * 16 + lane / 4;  // the thread's first row (and row + 8)
    Rows rw;
    load_rows(rw, ids, w, row, q);
    float dw[2][kPairs] = {};
    // the thread's entries of this warpgroup's dz sums (rows row, row + 8; ranks 2 q, 2 q + 1,
    // 8 + 2 q, 9 + 2 q of each pair's g and u); no other thread touches them
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int k = 0; k < 2 * kPairs; ++k) {
        float* z = dz_mine + 8 * r * kDzRowWords + k * kRank;
        *reinterpret_cast<float2*>(z) = make_float2(0.f, 0.f);
        *reinterpret_cast<float2*>(z + 8) = make_float2(0.f, 0.f);
      }
    }
    for (int nt = chunk * plan.tiles_per_chunk; nt < nt1; ++nt, ++i) {
      if (i % 2 != own) continue;
      if (i > 0) {  // the CTA's tile i - 1 (the other warpgroup's) has had all it waits for
        mbar_wait(turn0 + 8 * own, static_cast<uint32_t>(turns) & 1u);
        ++turns;
      }
      const int64_t at = static_cast<int64_t>(row) * I + nt * kTN + 2 * q;
      if (q == 0) {  // the first quarter's G and U rows, for the epilogue after the main loop
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          asm volatile("prefetch.global.L1 [%0];" ::"l"(G + at + r * 8 * I));
          asm volatile("prefetch.global.L1 [%0];" ::"l"(U + at + r * 8 * I));
        }
      }
      int it = i * k_steps, previous = -1;
      // the tile's first K step writes d only (the last tile's sums dead), then the rest
      main_step<true>(d, base, full0, empty0, it++, previous, lane);
      for (int ks = 1; ks < k_steps; ++ks) main_step<false>(d, base, full0, empty0, it++, previous, lane);
      const uint32_t parity = static_cast<uint32_t>(i) & 1u;  // each sub-block's barrier: a phase a tile
      mbar_wait(epi_full0, parity);
      if (lane == 0) mbar_arrive(turn0 + 8 * (1 - own));  // the other's next tile may start
      wgmma_wait<0>();
      fence_operands(d);
      if (lane == 0) mbar_arrive(empty0 + 8 * previous);
      // dhbar out as bf16 (pass 2 reads it), which the quarters read back: d is dead from here
      // to the next tile's first MMA, and its 64 registers free for the epilogue (NOTES v19)
      store_accumulators<16>(d, dhbar + static_cast<int64_t>(m0) * I + nt * kTN, I, warp, lane);

      // sub-block 0 (its operands waited for above), then 1, each released after its MMAs
#pragma unroll 1
      for (int c = 0; c < kTN / kSub; ++c) {
        if (c > 0) mbar_wait(epi_full0 + 8 * c, parity);
#pragma unroll 1
        for (int qq = 0; qq < (V19_ABLATE == 1 ? 0 : kSub / 32); ++qq) {
          const int64_t here = at + kSub * c + 32 * qq;
          epilogue_quarter(qq, rw, dw, dz_mine, epi, zg32, zu32, gzd32, G, U, dG, dU, dhbar, here,
                           c * 2 + qq + 1 < kTN / 32 ? here + 32 : -1, I);
        }
        if (lane == 0) mbar_arrive(epi_empty);  // its MMAs have completed (each waited for)
      }
    }
    // this warpgroup's partials of the item: dz_part / dw_part [2 chunk + own] at the block's rows
    const int64_t p = 2 * chunk + own;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int t = row + 8 * r;
#pragma unroll
      for (int k = 0; k < 2 * kPairs; ++k) {  // (pair, g | u)
        const float* z = dz_mine + 8 * r * kDzRowWords + k * kRank;
        float* out = dz_part + ((p * T + t) * kPairs * 2 + k) * kRank + 2 * q;
        *reinterpret_cast<float2*>(out) = *reinterpret_cast<const float2*>(z);
        *reinterpret_cast<float2*>(out + 8) = *reinterpret_cast<const float2*>(z + 8);
      }
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {  // the quad's columns summed
        float v = dw[r][j];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (q == 0) dw_part[(p * T + t) * kPairs + j] = v;
      }
    }
  }
#else
  (void)G, (void)U, (void)zg, (void)zu, (void)gzd, (void)ids, (void)w, (void)dG, (void)dU;
  (void)dhbar, (void)dz_part, (void)dw_part, (void)T, (void)H, (void)I, (void)plan_ctas;
  __trap();  // built without sm_90a
#endif
}

bool shape_ok(int T, int H, int I) {
  return T > 0 && H > 0 && I > 0 && T % kTM == 0 && H % kBK == 0 && I % kTN == 0;
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return -1;
  }
  return sms;
}

}  // namespace

// The number of dz / dw partials a launch with at most max_ctas CTAs (<= 0: one per SM) writes
// (their first dimension), or -1 for a shape the prototype does not take.
extern "C" int fused_bwd_partials(int T, int I, int max_ctas) {
  if (!shape_ok(T, kBK, I)) return -1;
  const int ctas = max_ctas > 0 ? max_ctas : sm_count();
  if (ctas <= 0) return -1;
  return 2 * make_plan(T, I, ctas, kTM, kTN).n_chunks;
}

// dG, dU [T, I], dhbar [T, I] (bf16), dz_part [P, T, 2, 2 R] and
// dw_part [P, T, 2] (fp32, P = fused_bwd_partials) from dout [T, H], wdt [I, H] (Wd^T), G, U
// [T, I], bgu [2 I, E R] (the forward's interleave of Bg / Bu), adt [I, E R] (Ad^T), bgut
// [2 E R, I] (Bg^T over Bu^T), zg / zu [T, 2, R] (s-scaled), gzd [T, 2, R] (bf16), ids [T, 2]
// int32 and w [T, 2] fp32, on `stream`. Returns 0, or 1 a shape or alignment it does not take, 2
// no cuTensorMapEncodeTiled, 3 a tensor map the driver refused, else the launch's CUDA error.
extern "C" int fused_moe_swiglu_bwd_bf16(const void* dout, const void* wdt, const void* g,
                                         const void* u, const void* bgu, const void* adt,
                                         const void* bgut, const void* zg, const void* zu,
                                         const void* gzd, const void* ids, const void* w, void* dG,
                                         void* dU, void* dhbar, void* dz_part, void* dw_part, int T,
                                         int H, int I, void* stream, int max_ctas) {
  if (!shape_ok(T, H, I) || dhbar == nullptr) return 1;
  const void* all[] = {dout, wdt, g, u, bgu, adt, bgut, zg, zu, gzd, ids, w, dG, dU, dhbar, dz_part, dw_part};
  for (const void* ptr : all) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return 1;
  }
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return 2;
  CUtensorMap map_dout{}, map_wdt{}, map_bgu{}, map_adt{}, map_bgut{};
  if (make_map(&map_dout, encode, dout, T, H, kTM) != CUDA_SUCCESS ||
      make_map(&map_wdt, encode, wdt, I, H, kTN) != CUDA_SUCCESS ||
      make_map(&map_bgu, encode, bgu, 2 * I, kER, 128) != CUDA_SUCCESS ||
      make_map(&map_adt, encode, adt, I, kER, kSub) != CUDA_SUCCESS ||
      make_map(&map_bgut, encode, bgut, 2 * kER, I, kER) != CUDA_SUCCESS) {
    return 3;
  }
  cudaError_t err = cudaFuncSetAttribute(fused_bwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kSmemBytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int ctas = max_ctas > 0 ? max_ctas : sm_count();
  if (ctas <= 0) return 1;
  const Plan plan = make_plan(T, I, ctas, kTM, kTN);
  const int grid = ctas < plan.items ? ctas : plan.items;
  fused_bwd_kernel<<<grid, kThreads, kSmemBytes, static_cast<cudaStream_t>(stream)>>>(
      map_dout, map_wdt, map_bgu, map_adt, map_bgut, static_cast<const __nv_bfloat16*>(g),
      static_cast<const __nv_bfloat16*>(u), static_cast<const __nv_bfloat16*>(zg),
      static_cast<const __nv_bfloat16*>(zu), static_cast<const __nv_bfloat16*>(gzd),
      static_cast<const int*>(ids), static_cast<const float*>(w), static_cast<__nv_bfloat16*>(dG),
      static_cast<__nv_bfloat16*>(dU), static_cast<__nv_bfloat16*>(dhbar),
      static_cast<float*>(dz_part), static_cast<float*>(dw_part), T, H, I, ctas);
  return static_cast<int>(cudaGetLastError());
}
