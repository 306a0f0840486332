// v17 (bench/NOTES.md): the MoE SwiGLU in the epilogue of our own Hopper gate / up GEMM, the
// fused-GEMM route's second step. Bench code, not a path of the library: it builds on v16's
// ping-pong GEMM (bench/wgmma_gemm_proto.cu, variant 1) and `bench/fused_gu_wgmma_proto.py`
// checks it against the fp32 reference and times it beside cuBLAS.
//
// For E = 8 experts of rank R = 16, k = 2 pairs a token, bf16, it computes for a token t with
// experts e_0, e_1 and weights w_0, w_1 (s the LoRA scale, folded into zg and zu by the caller):
//   g_j = x Wg^T + zg_j Bg[e_j]^T,  u_j = x Wu^T + zu_j Bu[e_j]^T,  h_j = silu(g_j) u_j
//   (v17: x Wg^T and x Wu^T rounded to bf16 first, as the library's GEMMs write them)
//   hbar = w_0 bf16(h_0) + w_1 h_1                                  [T, I] bf16
//   zd_j = bf16(h_j) Ad[e_j]^T, summed over I by column chunk and warpgroup [P, T, 2, R] fp32
// so G and U never go through device memory.
//
// The GEMM. Persistent CTAs (one per SM), each taking work items (a block of 128 tokens, a chunk
// of I's 64-column tiles; items M-fastest so CTAs running together read the same weight tiles).
// A tile is 128 tokens x 128 columns of the stacked weight Wgu, whose rows are Wg's and Wu's
// interleaved in blocks of 64 (rows 128 n .. 128 n + 63 = Wg's 64 n .., the next 64 = Wu's), so
// a tile holds G and U at the same 64 columns of I: in a thread's accumulators the n8 blocks j
// and j + 8 are G and U at the same (row, column). Warpgroup 0's first thread is the producer
// (4 stages of x 128 x 64 and Wgu 128 x 64, then the tile's epilogue operands: Bgu, Wgu's
// interleave of [Bg | Bu] over all experts, [128 columns, E R] in two boxes, and Ad's [E R, 64
// columns] into one 48 KiB buffer). Consumer warpgroups 1 and 2 take the CTA's tiles in turn,
// as v16's variant 1: while one runs its epilogue, the other's main loop keeps the tensor cores
// busy.
//
// The epilogue, per 64-row half of the tile (d0, d1), all on tensor cores:
//   1. the deltas of pair 0 as wgmma with A from registers: for each expert kappa, A = zg_0 of
//      the rows whose e_0 = kappa (others 0), B = Bgu's rows of the tile's G columns and expert
//      kappa's 16 K columns; the same for U. 16 x m64n64k16, accumulated onto the GEMM's sums.
//   2. h_0 = silu(g) u, kept as bf16 pairs (16 registers), which are already the A fragments
//      of the next product.
//   3. zd_0 += h_0 Ad^T: 4 x m64n32k16 a pair of experts, each row keeping its expert's columns
//      (a select), added to the warpgroup's zd sums in shared memory (over the item's tiles).
//   4. the deltas of pair 1 as in 1 with A = (Z_1 - Z_0) masked (a token's two experts differ,
//      so a row's kappa slot holds z_1, -z_0 or 0): the sums become x W^T + delta_1.
//   5. h_1, hbar = w_0 h_0 + w_1 h_1 stored as bf16; 6. zd_1 as in 3.
// The epilogue's MMAs are ~9% of the tile's main loop (bench/NOTES.md v16/v17).
// Barriers: stage full / empty (as v16), the epilogue buffer's full / empty, and the turn pair of
// v16's variant 1. A warpgroup hands the turn over only after it has waited for its epilogue
// buffer: so the other never waits on a "full" barrier whose previous phase is still open (a
// parity wait cannot tell that phase from its own; bench/wgmma_protocol_sim.py, variant 2).
//
// v18 (variant 1 of the launcher): the same with tiles of 64 tokens (one m64n128 accumulator, 64
// registers instead of 128) and the deltas of each pair into sums of their own (g = G + delta_j,
// G kept fp32), so that no ordinary instruction writes the main loop's accumulators and no
// epilogue wgmma adds into them: ptxas then keeps every wgmma pipelined, with no spills, even
// with the training variant's G / U stores; v17's form, at 128 tokens, does so only by the
// allocator's heuristics and not with the stores (bench/NOTES.md v17, v18). 6 stages of 24 KiB.
//
// v18c (variant 2): v18 in clusters of 2 CTAs that take the two 64-token blocks of an item in
// lockstep, each producer copying its own x rows and half of the weight rows and of the epilogue
// operands, the halves multicast into both CTAs: v17's L2 reads a FLOP with v18's registers.
// Shapes: T % 128 (v17, v18c) or 64 (v18) == 0, H % 64 == 0, I % 64 == 0, 16-byte aligned rows
// (the launcher checks).
#include "moe_epilogue.cuh"

namespace {

constexpr int kTN = 128;   // rows of Wgu a tile: 64 columns of G, then the same 64 of U
constexpr int kTI = 64;    // columns of I a tile
constexpr int kThreads = 384;  // the producer warpgroup and two consumer warpgroups
constexpr int kBoxBytes = 128 * kRowBytes;                 // a 128-row box: 16 KiB
constexpr int kEpiBytes = 3 * kBoxBytes;                   // Bgu K 0-63, Bgu K 64-127, Ad
// zd sums of a consumer warpgroup's rows over the item's tiles (fp32, [row][pair][rank], rows
// padded by 4 words against bank conflicts): in registers they spilled (NOTES v17).
constexpr int kZdRowWords = kPairs * kRank + 4;
static_assert(kER == 2 * kBK, "Bgu's K (E R) is two 64-column boxes");

// A tile's tokens are HALVES x 64: v17 (HALVES 2) holds 128 x 128 fp32 sums a consumer thread
// (two m64n128 accumulators), v18 (HALVES 1) 64 (bench/NOTES.md v18: what the registers allow).
template <int HALVES>
struct Shape {
  static constexpr int kTM = 64 * HALVES;                           // tokens a tile
  static constexpr int kStages = HALVES == 2 ? 4 : 6;
  static constexpr int kABytes = kTM * kRowBytes;                   // 16 / 8 KiB
  static constexpr int kStageBytes = kABytes + kTN * kRowBytes;     // 32 / 24 KiB
  static constexpr int kZdBytes = kTM * kZdRowWords * 4;            // 18 / 9 KiB
  static constexpr int kBarriers = 2 * kStages + 2 + 2;  // full, empty, epi full / empty, turn
  static constexpr int kSmemBytes =
      1024 + kStages * kStageBytes + kEpiBytes + 2 * kZdBytes + kBarriers * 8;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

#ifdef MIXLORA_PROTO_SM90A

// The CTA's place in the work: its first item and the item stride (its cluster's, when the CTAs
// go in pairs), and its token rows of an item.
template <int CLUSTER>
struct Walk {
  int first, stride, rank;
  __device__ __forceinline__ Walk() {
    rank = CLUSTER == 2 ? static_cast<int>(cluster_rank()) : 0;
    first = static_cast<int>(blockIdx.x) / CLUSTER;
    stride = static_cast<int>(gridDim.x) / CLUSTER;
  }
  // the first token row of the item's block for this CTA (v18c: blocks 2 m and 2 m + 1 of 64)
  __device__ __forceinline__ int m0(const Plan& plan, int item, int tm) const {
    return ((item % plan.m_blocks) * CLUSTER + rank) * tm;
  }
};

// The producer thread: for each of the CTA's tiles, its K steps into the stages, then its
// epilogue operands into the epilogue buffer once the previous tile's epilogue released it.
// v18c (CLUSTER 2): the two CTAs of a cluster take the two 64-token blocks of an item in
// lockstep; each copies its own x rows and half of the weight rows and of the epilogue operands,
// the halves multicast into both CTAs (whose barriers then count both CTAs' bytes and releases).
// v17s (SPLIT): the weight rows from Wg and Wu as the model holds them, no interleaved copy:
// map_wgu is then a 3-D map over (K, rows, {Wg, Wu}), its third stride Wu - Wg, whose box of
// 64 K x 64 rows x 2 lands as Wg's 64 rows, then Wu's: the interleaved copy's 128-row tile.
template <int HALVES, int CLUSTER, bool SPLIT>
__device__ __forceinline__ void produce(const CUtensorMap* map_x, const CUtensorMap* map_wgu,
                                        const CUtensorMap* map_bgu, const CUtensorMap* map_ad,
                                        uint32_t base, uint32_t epi, uint32_t full0,
                                        uint32_t empty0, uint32_t epi_full, uint32_t epi_empty,
                                        const Plan& plan, int k_steps) {
  static_assert(!SPLIT || CLUSTER == 1, "v17s: one CTA a tile");
  using S = Shape<HALVES>;
  constexpr int kStages = S::kStages, kStageBytes = S::kStageBytes, kABytes = S::kABytes;
  constexpr int kPart = 128 / CLUSTER;  // rows of a 128-row box each producer copies
  const Walk<CLUSTER> walk;
  const uint16_t both = 0x3;
  int it = 0, i = 0;
  for (int item = walk.first; item < plan.items; item += walk.stride) {
    const int m0 = walk.m0(plan, item, S::kTM), chunk = item / plan.m_blocks;
    const int nt1 = min(plan.n_tiles, (chunk + 1) * plan.tiles_per_chunk);
    for (int nt = chunk * plan.tiles_per_chunk; nt < nt1; ++nt, ++i) {
      for (int ks = 0; ks < k_steps; ++ks, ++it) {
        const int s = it % kStages;
        const uint32_t parity = (static_cast<uint32_t>(it / kStages) & 1u) ^ 1u;
        const uint32_t sa = base + s * kStageBytes;
        if constexpr (CLUSTER == 2) {
          mbar_wait<true>(empty0 + 8 * s, parity);
          mbar_expect_tx(full0 + 8 * s, kStageBytes);
          tma_load_2d(sa, map_x, full0 + 8 * s, ks * kBK, m0);
          tma_load_2d_multicast(sa + kABytes + walk.rank * kPart * kRowBytes, map_wgu, full0 + 8 * s,
                                ks * kBK, nt * kTN + walk.rank * kPart, both);
        } else {
          mbar_wait(empty0 + 8 * s, parity);
          mbar_expect_tx(full0 + 8 * s, kStageBytes);
          tma_load_2d(sa, map_x, full0 + 8 * s, ks * kBK, m0);
          if constexpr (SPLIT) {  // Wg's 64 rows of the tile's columns, then Wu's, in one copy
            tma_load_3d(sa + kABytes, map_wgu, full0 + 8 * s, ks * kBK, nt * kTI);
          } else {
            tma_load_2d(sa + kABytes, map_wgu, full0 + 8 * s, ks * kBK, nt * kTN);
          }
        }
      }
      const uint32_t parity = (static_cast<uint32_t>(i) & 1u) ^ 1u;
      if constexpr (CLUSTER == 2) {
        mbar_wait<true>(epi_empty, parity);
        mbar_expect_tx(epi_full, kEpiBytes);
        const uint32_t part = walk.rank * kPart * kRowBytes;
        const int row = walk.rank * kPart;
        tma_load_2d_multicast(epi + part, map_bgu, epi_full, 0, nt * kTN + row, both);
        tma_load_2d_multicast(epi + kBoxBytes + part, map_bgu, epi_full, kBK, nt * kTN + row, both);
        tma_load_2d_multicast(epi + 2 * kBoxBytes + part, map_ad, epi_full, nt * kTI, row, both);
      } else {
        mbar_wait(epi_empty, parity);
        mbar_expect_tx(epi_full, kEpiBytes);
        tma_load_2d(epi, map_bgu, epi_full, 0, nt * kTN);
        tma_load_2d(epi + kBoxBytes, map_bgu, epi_full, kBK, nt * kTN);
        tma_load_2d(epi + 2 * kBoxBytes, map_ad, epi_full, nt * kTI, 0);
      }
    }
  }
}

// The thread's A-fragment values of z [T, 2, R] for pairs 0 .. PAIR: [pair][row][ranks 2 q, 2 q
// + 1 / 8 + 2 q, 9 + 2 q] as bf16 pairs.
template <int PAIR>
__device__ __forceinline__ void load_z(uint32_t (&z)[kPairs][2][2], const uint32_t* __restrict__ z32,
                                       const Rows& rw) {
#pragma unroll
  for (int j = 0; j <= PAIR; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      z[j][r][0] = __ldg(z32 + rw.at[r] + j * (kRank / 2));
      z[j][r][1] = __ldg(z32 + rw.at[r] + j * (kRank / 2) + 4);
    }
  }
}

// A fragment of expert kappa's 16 K columns: pair 0 gives z_0 where e_0 = kappa; pair 1 gives
// z_1 where e_1 = kappa and -z_0 where e_0 = kappa (onto sums that already hold delta_0).
template <int PAIR>
__device__ __forceinline__ void masked_a(uint32_t (&a)[4], const uint32_t (&z)[kPairs][2][2],
                                         const Rows& rw, int kappa) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t z0 = rw.e[r][0] == kappa ? z[0][r][half] ^ 0x80008000u * PAIR : 0u;
      a[2 * half + r] = PAIR == 0 ? z0 : (rw.e[r][1] == kappa ? z[1][r][half] : z0);
    }
  }
}

// The sums d (64 rows x [64 of G | 64 of U]) += this pair's LoRA deltas (for pair 1: minus
// pair 0's, which d holds).
template <int PAIR>
__device__ __forceinline__ void add_deltas(float (&d)[64], const Rows& rw, uint32_t epi,
                                           const uint32_t* __restrict__ zg32,
                                           const uint32_t* __restrict__ zu32) {
  float(&dg)[32] = *reinterpret_cast<float(*)[32]>(&d[0]);
  float(&du)[32] = *reinterpret_cast<float(*)[32]>(&d[32]);
  uint32_t zg[kPairs][2][2], zu[kPairs][2][2];
  load_z<PAIR>(zg, zg32, rw);
  load_z<PAIR>(zu, zu32, rw);
#pragma unroll
  for (int kappa = 0; kappa < kExperts; ++kappa) {
    uint32_t ag[4], au[4];
    masked_a<PAIR>(ag, zg, rw, kappa);
    masked_a<PAIR>(au, zu, rw, kappa);
    // expert kappa's K columns: box kappa / 4, 16-column step kappa % 4 (32 bytes each)
    const uint32_t box = epi + (kappa / 4) * kBoxBytes;
    const uint64_t step = 2 * (kappa % 4);
    fence_operands(d);
    wgmma_fence();
    wgmma_m64n64k16_rs(dg, ag, sw128_desc(box) + step, 1u);
    wgmma_m64n64k16_rs(du, au, sw128_desc(box + 64 * kRowBytes) + step, 1u);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(d);
  }
}

// The deltas of pair PAIR alone, into fresh sums dl (64 rows x [64 of G | 64 of U]).
template <int PAIR>
__device__ __forceinline__ void deltas_fresh(float (&dl)[64], const Rows& rw, uint32_t epi,
                                             const uint32_t* __restrict__ zg32,
                                             const uint32_t* __restrict__ zu32) {
  float(&dg)[32] = *reinterpret_cast<float(*)[32]>(&dl[0]);
  float(&du)[32] = *reinterpret_cast<float(*)[32]>(&dl[32]);
  uint32_t zg[kPairs][2][2], zu[kPairs][2][2];
  load_z<1>(zg, zg32, rw);
  load_z<1>(zu, zu32, rw);
#pragma unroll
  for (int kappa = 0; kappa < kExperts; ++kappa) {
    uint32_t ag[4], au[4];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        ag[2 * half + r] = rw.e[r][PAIR] == kappa ? zg[PAIR][r][half] : 0u;
        au[2 * half + r] = rw.e[r][PAIR] == kappa ? zu[PAIR][r][half] : 0u;
      }
    }
    const uint32_t box = epi + (kappa / 4) * kBoxBytes;
    const uint64_t step = 2 * (kappa % 4);
    wgmma_fence();
    wgmma_m64n64k16_rs(dg, ag, sw128_desc(box) + step, kappa > 0 ? 1u : 0u);
    wgmma_m64n64k16_rs(du, au, sw128_desc(box + 64 * kRowBytes) + step, kappa > 0 ? 1u : 0u);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dl);
  }
}

// One 64-row half of a tile: deltas, SwiGLU, combine, zd. d: [64 G | 64 U] of the half's rows.
// v17 (SEPARATE false) adds the deltas onto d (pair 1's as Z_1 - Z_0); v18 (true) into sums of
// their own, d only read, so no ordinary instruction or epilogue wgmma touches the main loop's
// accumulators (NOTES v18).
template <bool SEPARATE>
__device__ __forceinline__ void epilogue_half(float (&d)[64], float* zd, const Rows& rw,
                                              const uint32_t* __restrict__ zg32,
                                              const uint32_t* __restrict__ zu32, uint32_t epi,
                                              __nv_bfloat16* __restrict__ hbar_rows, int64_t ld,
                                              int q) {
  const uint32_t ad = epi + 2 * kBoxBytes;
  const int e0[2] = {rw.e[0][0], rw.e[1][0]}, e1[2] = {rw.e[0][1], rw.e[1][1]};
  uint32_t h[16];
  float dl[SEPARATE ? 64 : 1];  // (v18) the pair's deltas
  if constexpr (SEPARATE) {
    deltas_fresh<0>(dl, rw, epi, zg32, zu32);
  } else {
    add_deltas<0>(d, rw, epi, zg32, zu32);
  }
  // g (v < 32) or u of the pair at accumulator index v
  const auto sum = [&](int v) {
    if constexpr (SEPARATE) {
      return d[v] + dl[v];
    } else {
      return d[v];
    }
  };
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int g = 4 * j + 2 * r, u = 32 + 4 * j + 2 * r;
      h[2 * j + r] = bf16x2(silu_mul(sum(g), sum(u)), silu_mul(sum(g + 1), sum(u + 1)));
    }
  }
  add_rank_sums<kTI / 16, kZdRowWords>(zd, h, e0, ad, 0);
  if constexpr (SEPARATE) {
    deltas_fresh<1>(dl, rw, epi, zg32, zu32);
  } else {
    add_deltas<1>(d, rw, epi, zg32, zu32);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int g = 4 * j + 2 * r, u = 32 + 4 * j + 2 * r;
      const float2 h0 = unpack_bf16x2(h[2 * j + r]);
      const float a = silu_mul(sum(g), sum(u)), b = silu_mul(sum(g + 1), sum(u + 1));
      const float w0 = rw.w[r][0], w1 = rw.w[r][1];
      *reinterpret_cast<uint32_t*>(hbar_rows + 8 * r * ld + 8 * j + 2 * q) =
          bf16x2(fmaf(w1, a, w0 * h0.x), fmaf(w1, b, w0 * h0.y));
      h[2 * j + r] = bf16x2(a, b);
    }
  }
  add_rank_sums<kTI / 16, kZdRowWords>(zd + kRank, h, e1, ad, 0);
}

#endif  // sm_90a

template <int HALVES, int CLUSTER, bool SPLIT = false>
__global__ void __launch_bounds__(kThreads, 1)
    fused_gu_kernel(const __grid_constant__ CUtensorMap map_x,
                    const __grid_constant__ CUtensorMap map_wgu,
                    const __grid_constant__ CUtensorMap map_bgu,
                    const __grid_constant__ CUtensorMap map_ad,
                    const __nv_bfloat16* __restrict__ zg, const __nv_bfloat16* __restrict__ zu,
                    const int* __restrict__ ids, const float* __restrict__ w,
                    __nv_bfloat16* __restrict__ hbar, float* __restrict__ zd_part,
                    __nv_bfloat16* __restrict__ g_out, __nv_bfloat16* __restrict__ u_out, int T,
                    int H, int I, int plan_ctas) {
#ifdef MIXLORA_PROTO_SM90A
  using S = Shape<HALVES>;
  constexpr int kStages = S::kStages, kStageBytes = S::kStageBytes, kTM = S::kTM;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t epi = base + kStages * kStageBytes;
  const uint32_t zd_buf = epi + kEpiBytes;  // the two consumer warpgroups' zd sums
  const uint32_t full0 = zd_buf + 2 * S::kZdBytes, empty0 = full0 + 8 * kStages;
  const uint32_t epi_full = empty0 + 8 * kStages, epi_empty = epi_full + 8;
  const uint32_t turn0 = epi_empty + 8;  // turn[w] at turn0 + 8 w
  const int wg = static_cast<int>(threadIdx.x) / 128, tid = static_cast<int>(threadIdx.x) % 128;
  // the launcher's plan (gridDim.x may be fewer), over clusters and pairs of token blocks in v18c
  const Plan plan = make_plan(T, I, plan_ctas / CLUSTER, kTM * CLUSTER, kTI);
  const Walk<CLUSTER> walk;
  const int k_steps = H / kBK;
  if (threadIdx.x == 0) {
    // "empty" and the epilogue buffer's: the 4 warps of the tile's owner, in each CTA of v18c
    init_stage_barriers(full0, empty0, kStages, 4 * CLUSTER);
    mbar_init(epi_full, 1);
    mbar_init(epi_empty, 4 * CLUSTER);
    mbar_init(turn0, 4);
    mbar_init(turn0 + 8, 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (CLUSTER == 2) {
    cluster_sync();  // no copy or release reaches the other CTA's barriers before they are made
  } else {
    __syncthreads();
  }
  if (wg == 0) {  // the producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid == 0) {
      produce<HALVES, CLUSTER, SPLIT>(&map_x, &map_wgu, &map_bgu, &map_ad, base, epi, full0,
                                      empty0, epi_full, epi_empty, plan, k_steps);
    }
    if constexpr (CLUSTER == 2) cluster_sync();  // (the consumers' at the end)
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  const int own = wg - 1;  // this warpgroup's tiles: the CTA's i-th with i % 2 == own
  const int warp = tid / 32, lane = tid % 32, q = lane % 4;
  float* zd_mine = reinterpret_cast<float*>(smem_raw + (zd_buf - smem_u32(smem_raw))) +
                   own * (S::kZdBytes / 4) + (warp * 16 + lane / 4) * kZdRowWords + 2 * q;
  const uint32_t* zg32 = reinterpret_cast<const uint32_t*>(zg);
  const uint32_t* zu32 = reinterpret_cast<const uint32_t*>(zu);
  float d0[64], d1[64];  // rows 0-63 and (v17) 64-127 of the tile
#pragma unroll
  for (int v = 0; v < 64; ++v) d0[v] = d1[v] = 0.f;
  int i = 0, turns = 0;
  // (without clusters the loop written as v17 first had it: v17's registers fit ptxas's
  // pipelining by heuristics that an equivalent form of this loop upsets, NOTES v17 / v18c)
  for (int item = CLUSTER == 1 ? static_cast<int>(blockIdx.x) : walk.first; item < plan.items;
       item += CLUSTER == 1 ? static_cast<int>(gridDim.x) : walk.stride) {
    const int m0 = CLUSTER == 1 ? (item % plan.m_blocks) * kTM : walk.m0(plan, item, kTM);
    const int chunk = item / plan.m_blocks;
    const int nt1 = min(plan.n_tiles, (chunk + 1) * plan.tiles_per_chunk);
    // the thread's entries of this warpgroup's zd sums: rows 16 warp + lane / 4 (+ 8, + 64,
    // + 72), ranks 2 q, 2 q + 1, 8 + 2 q, 9 + 2 q of both pairs; no other thread touches them
#pragma unroll
    for (int half = 0; half < HALVES; ++half) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
          float* z = zd_mine + (64 * half + 8 * r) * kZdRowWords + j * kRank;
          *reinterpret_cast<float2*>(z) = make_float2(0.f, 0.f);
          *reinterpret_cast<float2*>(z + 8) = make_float2(0.f, 0.f);
        }
      }
    }
    for (int nt = chunk * plan.tiles_per_chunk; nt < nt1; ++nt, ++i) {
      if (i % 2 != own) continue;
      if (i > 0) {  // the CTA's tile i - 1 (the other warpgroup's) has had all it waits for
        mbar_wait(turn0 + 8 * own, static_cast<uint32_t>(turns) & 1u);
        ++turns;
      }
      int it = i * k_steps, previous = -1;
      for (int ks = 0; ks < k_steps; ++ks, ++it) {
        const int s = it % kStages;
        mbar_wait(full0 + 8 * s, static_cast<uint32_t>(it / kStages) & 1u);
        const uint32_t sa = base + s * kStageBytes;
        const uint64_t desc_a0 = sw128_desc(sa), desc_a1 = sw128_desc(sa + 64 * kRowBytes);
        const uint64_t desc_b = sw128_desc(sa + S::kABytes);
        fence_operands(d0);
        if constexpr (HALVES == 2) fence_operands(d1);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < kBK / 16; ++k) {
          const uint32_t accumulate = (ks > 0 || k > 0) ? 1u : 0u;
          wgmma_m64n128k16(d0, desc_a0 + 2 * k, desc_b + 2 * k, accumulate);
          if constexpr (HALVES == 2) wgmma_m64n128k16(d1, desc_a1 + 2 * k, desc_b + 2 * k, accumulate);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(d0);
        if constexpr (HALVES == 2) fence_operands(d1);
        if (previous >= 0 && lane == 0) release<CLUSTER>(empty0 + 8 * previous, static_cast<uint32_t>(walk.rank));
        previous = s;
      }
      mbar_wait(epi_full, static_cast<uint32_t>(i) & 1u);
      if (lane == 0) mbar_arrive(turn0 + 8 * (1 - own));  // the other's next tile may start
      wgmma_wait<0>();
      fence_operands(d0);
      if constexpr (HALVES == 2) fence_operands(d1);
      if (lane == 0) release<CLUSTER>(empty0 + 8 * previous, static_cast<uint32_t>(walk.rank));

      const int row = m0 + warp * 16 + lane / 4;  // the thread's first row in half 0
      __nv_bfloat16* hbar_rows = hbar + static_cast<int64_t>(row) * I + nt * kTI;
      Rows rw;
      if constexpr (HALVES == 2) {
        // G and U rounded to bf16 as the library's GEMMs write them (moe_swiglu adds the deltas
        // to those); the second half waits as bf16 pairs, 32 registers instead of 64.
        uint32_t wait1[32];
#pragma unroll
        for (int v = 0; v < 32; ++v) {
          wait1[v] = bf16x2(d1[2 * v], d1[2 * v + 1]);
          const float2 r = unpack_bf16x2(bf16x2(d0[2 * v], d0[2 * v + 1]));
          d0[2 * v] = r.x;
          d0[2 * v + 1] = r.y;
        }
        load_rows(rw, ids, w, row, q);
        epilogue_half<false>(d0, zd_mine, rw, zg32, zu32, epi, hbar_rows, I, q);
#pragma unroll
        for (int v = 0; v < 32; ++v) {
          const float2 r = unpack_bf16x2(wait1[v]);
          d1[2 * v] = r.x;
          d1[2 * v + 1] = r.y;
        }
        load_rows(rw, ids, w, row + 64, q);
        epilogue_half<false>(d1, zd_mine + 64 * kZdRowWords, rw, zg32, zu32, epi,
                      hbar_rows + static_cast<int64_t>(64) * I, I, q);
      } else {
        // v18: the sums stay fp32 into the deltas (no ordinary instruction writes an
        // accumulator: ptxas then keeps the wgmma pipelined, NOTES v18); in training G and U go
        // out as bf16 for the backward, read from the accumulators
        if (g_out != nullptr) {
          const int64_t at = static_cast<int64_t>(row) * I + nt * kTI + 2 * q;
#pragma unroll
          for (int v = 0; v < 32; ++v) {  // pair v: v < 16 G's n8 block v / 2, else U's
            __nv_bfloat16* o = (v < 16 ? g_out : u_out) + at + (v % 2) * 8 * I + 8 * ((v % 16) / 2);
            *reinterpret_cast<uint32_t*>(o) = bf16x2(d0[2 * v], d0[2 * v + 1]);
          }
        }
        load_rows(rw, ids, w, row, q);
        epilogue_half<true>(d0, zd_mine, rw, zg32, zu32, epi, hbar_rows, I, q);
      }
      if (lane == 0) release<CLUSTER>(epi_empty, static_cast<uint32_t>(walk.rank));  // its MMAs have completed (each waited for)
    }
    // this warpgroup's partial of the item: zd_part[2 chunk + own] at the block's rows
    float* part = zd_part + (static_cast<int64_t>(2 * chunk + own) * T) * kPairs * kRank;
#pragma unroll
    for (int half = 0; half < HALVES; ++half) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = m0 + 64 * half + warp * 16 + lane / 4 + 8 * r;
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
          const float* z = zd_mine + (64 * half + 8 * r) * kZdRowWords + j * kRank;
          float* out = part + (static_cast<int64_t>(t) * kPairs + j) * kRank + 2 * q;
          *reinterpret_cast<float2*>(out) = *reinterpret_cast<const float2*>(z);
          *reinterpret_cast<float2*>(out + 8) = *reinterpret_cast<const float2*>(z + 8);
        }
      }
    }
  }
  if constexpr (CLUSTER == 2) cluster_sync();  // the other CTA's releases here are all in
#else
  (void)zg, (void)zu, (void)ids, (void)w, (void)hbar, (void)zd_part, (void)g_out, (void)u_out;
  (void)T, (void)H, (void)I, (void)plan_ctas;
  __trap();  // built without sm_90a
#endif
}

// What a launch of `variant` takes: 0 v17 (tiles of 128 tokens), 1 v18 (64), 2 v18c (64, the
// CTAs in clusters of 2 over pairs of token blocks), 3 v17s (v17 reading Wg and Wu as they are);
// tm 0 for no variant.
struct Variant {
  int tm, cluster;
  bool split;
};

Variant variant_of(int variant) {
  switch (variant) {
    case 0: return Variant{128, 1, false};
    case 1: return Variant{64, 1, false};
    case 2: return Variant{64, 2, false};
    case 3: return Variant{128, 1, true};
    default: return Variant{0, 0, false};
  }
}

}  // namespace

// The number of zd partials a launch of `variant` with at most max_ctas CTAs (<= 0: one per SM)
// writes (zd_part's first dimension), or -1 for a shape or variant the prototype does not take.
extern "C" int fused_gu_partials(int T, int I, int max_ctas, int variant) {
  const Variant v = variant_of(variant);
  if (v.tm == 0 || T <= 0 || I <= 0 || T % (v.tm * v.cluster) != 0 || I % kTI != 0) return -1;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return -1;
  }
  const int ctas = (max_ctas > 0 ? max_ctas : sms) / v.cluster;  // CTAs, or clusters
  if (ctas <= 0) return -1;
  return 2 * make_plan(T, I, ctas, v.tm * v.cluster, kTI).n_chunks;
}

// hbar [T, I] and zd_part [P, T, 2, 16] (P = fused_gu_partials) from x [T, H], wgu [2 I, H]
// (Wg / Wu rows interleaved in blocks of 64; v17s, variant 3: wgu = Wg [I, H] and wu = Wu [I, H]
// as the model holds them, no copy; wu null for the others), bgu [2 I, E R] (Bg / Bu interleaved the same way,
// expert-major columns), ad [E R, I], zg / zu [T, 2, 16] (s-scaled, bf16), ids [T, 2] int32 and
// w [T, 2] fp32, on `stream`, by v17 (variant 0: tiles of 128 tokens, G and U rounded to bf16
// before the deltas), v18 (1: tiles of 64 tokens, the sums kept fp32) or v18c (2: v18 in 2-CTA
// clusters sharing the weight and epilogue tiles by multicast; T % 128); v18 and v18c with g_out
// and u_out (both or neither) also write G and U [T, I] bf16, the frozen GEMM's sums the
// backward reads (training). Returns 0, or 1 a shape, alignment or variant it does not take, 2
// no cuTensorMapEncodeTiled, 3 a tensor map the driver refused, else the launch's CUDA error.
extern "C" int fused_gu_moe_swiglu_bf16(const void* x, const void* wgu, const void* wu,
                                        const void* bgu, const void* ad, const void* zg, const void* zu,
                                        const void* ids, const void* w, void* hbar, void* zd_part,
                                        void* g_out, void* u_out, int T, int H, int I,
                                        void* stream, int max_ctas, int variant) {
  const Variant v = variant_of(variant);
  if (v.tm == 0 || T <= 0 || H <= 0 || I <= 0 || T % (v.tm * v.cluster) != 0 || H % kBK != 0 ||
      I % kTI != 0) {
    return 1;
  }
  if ((g_out == nullptr) != (u_out == nullptr) || (g_out != nullptr && v.tm == 128)) return 1;
  if ((wu != nullptr) != v.split) return 1;
  // v17s: one 3-D map over Wg and Wu, whose third stride must be positive and 16-byte aligned
  const intptr_t gap = reinterpret_cast<intptr_t>(wu) - reinterpret_cast<intptr_t>(wgu);
  if (v.split && (gap <= 0 || gap % 16 != 0)) return 1;
  const uintptr_t all = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(wgu) |
                        reinterpret_cast<uintptr_t>(wu) |
                        reinterpret_cast<uintptr_t>(bgu) | reinterpret_cast<uintptr_t>(ad) |
                        reinterpret_cast<uintptr_t>(zg) | reinterpret_cast<uintptr_t>(zu) |
                        reinterpret_cast<uintptr_t>(ids) | reinterpret_cast<uintptr_t>(w) |
                        reinterpret_cast<uintptr_t>(hbar) | reinterpret_cast<uintptr_t>(zd_part) |
                        reinterpret_cast<uintptr_t>(g_out) | reinterpret_cast<uintptr_t>(u_out);
  if (all % 16 != 0) return 1;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return 2;
  // v18c's producers each copy half of the rows of a 128-row box (multicast into both CTAs)
  const int part = 128 / v.cluster;
  CUtensorMap map_x{}, map_wgu{}, map_bgu{}, map_ad{};
  // v17s: wgu is Wg [I, H] and wu Wu, one 3-D map over both; else wgu [2 I, H]
  const CUresult weights = v.split ? make_map_pair(&map_wgu, encode, wgu, gap, I, H, kTI)
                                   : make_map(&map_wgu, encode, wgu, 2 * I, H, part);
  if (weights != CUDA_SUCCESS) return 3;
  if (make_map(&map_x, encode, x, T, H, v.tm) != CUDA_SUCCESS ||
      make_map(&map_bgu, encode, bgu, 2 * I, kER, part) != CUDA_SUCCESS ||
      make_map(&map_ad, encode, ad, kER, I, part) != CUDA_SUCCESS) {
    return 3;
  }
  const auto kernel = variant == 0   ? fused_gu_kernel<2, 1>
                      : variant == 1 ? fused_gu_kernel<1, 1>
                      : variant == 2 ? fused_gu_kernel<1, 2>
                                     : fused_gu_kernel<2, 1, true>;
  const int smem = v.tm == 128 ? Shape<2>::kSmemBytes : Shape<1>::kSmemBytes;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  }
  if (err != cudaSuccess) return static_cast<int>(err);
  const int units = (max_ctas > 0 ? max_ctas : sms) / v.cluster;  // CTAs, or clusters
  if (units <= 0) return 1;
  const Plan plan = make_plan(T, I, units, v.tm * v.cluster, kTI);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3((units < plan.items ? units : plan.items) * v.cluster);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute cluster[1]{};
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = 2;
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  if (v.cluster == 2) {
    config.attrs = cluster;
    config.numAttrs = 1;
  }
  err = cudaLaunchKernelEx(&config, kernel, map_x, map_wgu, map_bgu, map_ad,
                           static_cast<const __nv_bfloat16*>(zg), static_cast<const __nv_bfloat16*>(zu),
                           static_cast<const int*>(ids), static_cast<const float*>(w),
                           static_cast<__nv_bfloat16*>(hbar), static_cast<float*>(zd_part),
                           static_cast<__nv_bfloat16*>(g_out), static_cast<__nv_bfloat16*>(u_out), T, H,
                           I, units * v.cluster);
  return static_cast<int>(err != cudaSuccess ? err : cudaGetLastError());
}
