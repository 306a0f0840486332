// Tensor-core backward pass 2 of the fused expert SwiGLU for bfloat16: the weight gradients
// dBg, dBu, dAd, expert-major (docs/design.md, "Fused expert SwiGLU").
//
// The CUDA-core kernel (moe_swiglu_bwd_expert_fast_kernel, swiglu_kernels.cu) spends ~130
// instructions per (pair, column), mostly on three rank-r dot products (the LoRA deltas) and
// three rank-r accumulations. Here both are warp MMAs (mma.sync m16n8k16, bf16 in, fp32
// accumulate), with the columns as the MMA rows (M) throughout:
//   recompute  lg^T [cols, pairs] = Bg_e [cols, Rg] @ zg^T        (lu likewise with Bu, zu)
//              ag^T [cols, pairs] = Ad_e^T [cols, Rd] @ grad_zd^T
//   gradients  dBg_e [cols, Rg]  += dg^T [cols, pairs] @ zg [pairs, Rg]   (x s at the end)
//              dBu_e [cols, Ru]  += du^T [cols, pairs] @ zu [pairs, Ru]
//              dAd_e^T [cols, Rd] += (m h)^T [cols, pairs] @ grad_zd [pairs, Rd]
// The recompute's accumulator layout (thread: column row g / g + 8, pairs 2c, 2c + 1 of each
// n-tile of 8 pairs) is exactly the A-operand layout of the gradient MMAs (K = pairs), so dg,
// du, m h go from the elementwise math straight into A fragments: no transpose. The weights'
// A fragments (this warp's 16 columns x all ranks of Bg_e, Bu_e, Ad_e^T) are loaded once per
// block into registers; z comes from shared memory through ldmatrix (pairs x ranks for the
// recompute's B operand) and ldmatrix.trans (the same tile, as the gradients' B operand). MMA
// row g of a warp is column 2g of its 16, row g + 8 column 2g + 1: a thread's two columns are
// adjacent, so G, U, grad_hbar come as bf16 pairs (one 32-bit load) and dAd is stored likewise.
//
// Precision: the forward's rank-r operands are bf16 (docs/design.md): z rounded, m h rounded,
// and pass 1 rounds grad_zd for its Ad^T @ grad_zd. A small kernel (wgrad_split_z_kernel)
// writes them once, in `order`'s (sorted) positions, as bf16 terms in the workspace: zg, zu
// rounded, grad_zd rounded (hi) and its rounded rest (lo) (rows already padded as shared
// memory holds them, so a chunk's z is one contiguous copy), with each position's pair, token
// and routing weight. The recompute takes zg, zu and grad_zd's hi, as the forward and pass 1
// do; the gradients split dg, du into hi (truncated) + lo (the rounded rest) and take
// hi x z + lo x z, and dAd takes (m h) x hi + (m h) x lo: ~16 bits of the fp32 factor, far
// below the bf16 rounding of the outputs (before v12 z and m h were split too, and grad_zd
// into three terms: bench/NOTES.md v12).
//
// Block (expert e, pair split, column tile of kWgCols): kWgWarps warps, warp w owns columns
// 16w .. 16w + 15 of the tile and all ranks; the block walks its share of e's pairs (sorted
// positions [begin, end)) kWgChunk at a time, each chunk's G, U, grad_hbar rows (gathered by
// token) and z terms copied with cp.async one chunk ahead (two stages, one barrier per chunk;
// the pair metadata that the row addresses need is loaded one chunk earlier still). Each warp
// takes the chunk's pairs 16 at a time (one k-step of the gradient MMAs). blockIdx.x runs over
// the experts fastest, so the k blocks that read a token's rows run at about the same time
// (their pairs are sorted by token) and share them in L2. 4 warps; ranks padded to 16 * R16,
// R16 = 1 .. 4 (ranks <= 64): R16 = 1 up to 128 registers, 41.5 KB of shared memory, 4 blocks
// per SM; R16 = 2 up to 168 registers, 3 blocks; R16 = 3, 4 (accumulators 24 R16 and weight
// fragments 12 R16 registers a thread) up to 255 registers (~200 and ~240 used, no spills),
// 58 KB and 66 KB: 2 blocks per SM (registers), each block still computing all ranks (no rank
// tiles: the recompute needs every rank).
//
// Summation order: each (e, column, rank) sum belongs to one thread of one warp: MMAs over the
// split's pairs in chunk order, 16 pairs per MMA (the hardware's order inside, fixed). Splits
// (a number from the shapes alone) write fp32 partials [splits, E, Rg + Ru + Rd, I] that the
// caller adds in split order (sum_splits_kernel). No atomics: two runs give identical bits.
#include <algorithm>

#include "swiglu/swiglu_fast_math.cuh"
#include "swiglu/swiglu_kernels.cuh"

namespace mixlora {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWgWarps = 4;
constexpr int kWgThreads = kWgWarps * kWarpSize;
constexpr int kWgCols = 16 * kWgWarps;     // columns of a block (16 per warp: one MMA m-tile)
constexpr int kWgChunk = 32;               // pairs per staged chunk
constexpr int kWgColStride = kWgCols + 8;  // staged row stride (bf16): conflict-free 32-bit loads
constexpr int kWgTerms = 4;                // zg, zu, grad_zd hi, grad_zd lo
constexpr int kWgMaxRank = 64;
constexpr int kWgMaxSplits = 8;
constexpr int kWgTargetBlocks = 1024;      // blocks the pair splits aim for (shapes only)
constexpr int kWgSplitThreads = 256;
enum : int { kZg = 0, kZu, kGzHi, kGzLo };

// R16: ranks padded to 16 * R16 (the MMA's k-step). A position's z row: [kWgTerms, RS] bf16
// and 8 more, RS = padded ranks + 8 (ranks past R and the row's last 8 zero): with rows of
// kWgTerms * RS + 8 bf16 (208, 336, 464 or 592 bytes: 16 x an odd number mod 128) the 8 rows
// of an ldmatrix tile hit distinct banks. Shared memory per stage: z [kWgChunk, kZRow]; G, U,
// grad_hbar [3, kWgChunk, kWgColStride]; the chunk's pairs q [kWgChunk] (int32, -1 past the
// split's end) and their routing weights [kWgChunk].
// RS and a position's z row (bf16) for ranks padded to 16 * r16; used by the layout, the split
// kernel and the host's workspace size alike.
__host__ __device__ constexpr int wgrad_rs(int r16) { return 16 * r16 + 8; }
__host__ __device__ constexpr int wgrad_zrow_of_rs(int rs) { return kWgTerms * rs + 8; }
__host__ __device__ constexpr int wgrad_zrow(int r16) { return wgrad_zrow_of_rs(wgrad_rs(r16)); }

template <int R16>
struct WgLayout {
  static constexpr int RS = wgrad_rs(R16);
  static constexpr int kZRow = wgrad_zrow(R16);  // bf16 per position
  static_assert((kZRow * 2 / 16) % 2 == 1, "conflict-free ldmatrix rows");
  static constexpr int kZBytes = kWgChunk * kZRow * 2;
  static constexpr int kRowBytes = 3 * kWgChunk * kWgColStride * 2;
  static constexpr int kStageBytes = kZBytes + kRowBytes + kWgChunk * 8;
  static constexpr int kSmem = 2 * kStageBytes;
  static_assert(kZBytes % 16 == 0 && kRowBytes % 16 == 0, "16-byte aligned stage parts");
};

// Two bf16 as one MMA operand word (lo in the low half): pack_bf16x2 of the pair.
__device__ __forceinline__ uint32_t pack2(bf16 lo, bf16 hi) {
  return pack_bf16x2(__halves2bfloat162(lo, hi));
}

// (a, b) = hi + lo as bf16 pairs: hi the truncated values (their top 16 bits: one byte
// permute), lo the rest rounded (|rest| < 2^-7 |x|, so hi + lo keeps ~16 bits; no overflow).
__device__ __forceinline__ void split_trunc_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const uint32_t ua = __float_as_uint(a), ub = __float_as_uint(b);
  hi = __byte_perm(ua, ub, 0x7632);
  lo = pack_bf16x2(__floats2bfloat162_rn(a - __uint_as_float(ua & 0xffff0000u),
                                         b - __uint_as_float(ub & 0xffff0000u)));
}

struct WgFlags {
  bool g, u, gzd;  // Bg (with zg), Bu (with zu), grad_zd (with Ad) present
};

__host__ __device__ __forceinline__ WgFlags wgrad_flags(const MoeSwigluBackwardParams& p) {
  return {p.Bg != nullptr && p.Rg > 0, p.Bu != nullptr && p.Ru > 0,
          p.grad_zd != nullptr && p.Ad != nullptr && p.Rd > 0};
}

// zs[pos] = the bf16 terms of pair q = order[pos]'s zg, zu, grad_zd ([kWgTerms, RS] and 8
// zeros, zero past the rank and for absent ones), meta[pos] = (q, q / k, bits of weights[q],
// 0). One thread per (pos, rank pair).
template <int RS>
__global__ void __launch_bounds__(kWgSplitThreads)
    wgrad_split_z_kernel(MoeSwigluBackwardParams p, bf16* zs, int4* meta) {
  const int64_t N = p.T * p.k;
  const int64_t idx = int64_t(blockIdx.x) * kWgSplitThreads + threadIdx.x;
  if (idx >= N * (RS / 2)) return;
  const int64_t pos = idx / (RS / 2);
  const int j = static_cast<int>(idx % (RS / 2)), r = 2 * j;
  const int64_t q = p.order[pos];
  const WgFlags has = wgrad_flags(p);
  uint32_t* row = reinterpret_cast<uint32_t*>(zs + pos * wgrad_zrow_of_rs(RS)) + j;
  auto two = [&](bool present, const void* src, int64_t R, float& a, float& b) {
    const float* z = static_cast<const float*>(src) + q * R;
    a = present && r < R ? z[r] : 0.f;
    b = present && r + 1 < R ? z[r + 1] : 0.f;
  };
  float a, b;
  two(has.g, p.zg, p.Rg, a, b);
  row[kZg * RS / 2] = pack_bf16x2(__floats2bfloat162_rn(a, b));
  two(has.u, p.zu, p.Ru, a, b);
  row[kZu * RS / 2] = pack_bf16x2(__floats2bfloat162_rn(a, b));
  two(has.gzd, p.grad_zd, p.Rd, a, b);
  split_bf16x2(a, b, row[kGzHi * RS / 2], row[kGzLo * RS / 2]);
  if (j < 4) row[kWgTerms * RS / 2] = 0u;  // the row's last 8 bf16 (RS / 2 >= 12 > j)
  if (j == 0) {
    const float w = static_cast<const float*>(p.weights)[q];
    meta[pos] = make_int4(static_cast<int>(q), static_cast<int>(q / p.k), __float_as_int(w), 0);
  }
}

// The A fragments (m16 x k16, R16 k-steps) of a weight W(col, r) at this thread's columns
// col0 (MMA row g) and col0 + 1 (row g + 8): W(col, r) = W[col * col_stride + r * rank_stride],
// zero past I or R.
template <int R16>
__device__ __forceinline__ void weight_frags(const bf16* W, int64_t col_stride, int64_t rank_stride,
                                             int64_t col0, int64_t I, int64_t R,
                                             uint32_t (&a)[R16][4]) {
  const int c = (threadIdx.x % kWarpSize) % 4;
  const bf16 zero = __float2bfloat16_rn(0.f);
  auto w = [&](int64_t col, int64_t r) {
    return W != nullptr && col < I && r < R ? W[col * col_stride + r * rank_stride] : zero;
  };
#pragma unroll
  for (int kc = 0; kc < R16; ++kc) {
    const int64_t r = kc * 16 + 2 * c;
    a[kc][0] = pack2(w(col0, r), w(col0, r + 1));
    a[kc][1] = pack2(w(col0 + 1, r), w(col0 + 1, r + 1));
    a[kc][2] = pack2(w(col0, r + 8), w(col0, r + 9));
    a[kc][3] = pack2(w(col0 + 1, r + 8), w(col0 + 1, r + 9));
  }
}

// Block (e = blockIdx.x % E, split = blockIdx.x / E, column tile blockIdx.y); see the top of
// the file. zs, meta: wgrad_split_z_kernel's output. splits == 1: the outputs; else fp32
// partials at p.workspace [splits, E, Rg + Ru + Rd, I] (unscaled). DROP: p.dropout_p > 0.
template <int R16, int ACT, bool DROP>
__global__ void __launch_bounds__(kWgThreads, R16 == 1 ? 4 : R16 == 2 ? 3 : 2)
    moe_swiglu_wgrad_mma_kernel(MoeSwigluBackwardParams p, const bf16* zs, const int4* meta,
                                int64_t splits) {
  using L = WgLayout<R16>;
  constexpr int RS = L::RS, kZRow = L::kZRow;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t smem_u32 = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const WgFlags has = wgrad_flags(p);
  const int64_t I = p.I;
  const int64_t e = blockIdx.x % p.E, split = blockIdx.x / p.E;
  const int64_t col_base = int64_t(blockIdx.y) * kWgCols;
  const int64_t col0 = col_base + warp * 16 + 2 * g;  // MMA row g; row g + 8 is col0 + 1

  uint32_t bg_a[R16][4], bu_a[R16][4], ad_a[R16][4];
  weight_frags<R16>(has.g ? static_cast<const bf16*>(p.Bg) + e * I * p.Rg : nullptr, p.Rg, 1,
                    col0, I, p.Rg, bg_a);
  weight_frags<R16>(has.u ? static_cast<const bf16*>(p.Bu) + e * I * p.Ru : nullptr, p.Ru, 1,
                    col0, I, p.Ru, bu_a);
  weight_frags<R16>(has.gzd ? static_cast<const bf16*>(p.Ad) + e * p.Rd * I : nullptr, 1, I,
                    col0, I, p.Rd, ad_a);

  float acc_g[2 * R16][4] = {}, acc_u[2 * R16][4] = {}, acc_d[2 * R16][4] = {};

  const int64_t first = p.offsets[e], count = p.offsets[e + 1] - first;
  const int64_t begin = first + count * split / splits;
  const int64_t end = first + count * (split + 1) / splits;

  // Copy roles: rows crow and crow + 16 of a chunk, 16-byte piece cpiece of the block's columns.
  constexpr int kPieces = kWgCols / 8;
  static_assert(kWgThreads / kPieces * 2 == kWgChunk, "two staged rows per thread");
  const int crow = threadIdx.x / kPieces, cpiece = threadIdx.x % kPieces;
  const int64_t ccol = col_base + cpiece * 8;
  const bool ccol_ok = ccol < I;  // (I % 8 == 0: the whole piece)
  int4 m_next[2];                 // meta of the rows of the next chunk to stage (q = -1: none)
  auto fetch_meta = [&](int64_t base) {  // plain loads, consumed one chunk later
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t pos = base + crow + 16 * h;
      m_next[h] = pos < end ? meta[pos] : make_int4(-1, 0, 0, 0);
    }
  };
  const bf16* G = static_cast<const bf16*>(p.G);
  const bf16* U = static_cast<const bf16*>(p.U);
  const bf16* GH = static_cast<const bf16*>(p.grad_hbar);
  auto stage_chunk = [&](int st, int64_t base) {
    unsigned char* S = smem + st * L::kStageBytes;
    bf16* z_s = reinterpret_cast<bf16*>(S);
    bf16* rows_s = reinterpret_cast<bf16*>(S + L::kZBytes);
    int* q_s = reinterpret_cast<int*>(S + L::kZBytes + L::kRowBytes);
    float* w_s = reinterpret_cast<float*>(q_s + kWgChunk);
    // The chunk's z rows: one contiguous run of 16-byte pieces in zs (rows past end: zeros,
    // their source address clamped to the last valid piece).
    constexpr int kZTotal = kWgChunk * kZRow / 8;
    const int valid_pieces = static_cast<int>(min(int64_t(kWgChunk), end - base)) * (kZRow / 8);
    const bf16* zsrc = zs + base * kZRow;
#pragma unroll
    for (int j = 0; j < (kZTotal + kWgThreads - 1) / kWgThreads; ++j) {
      const int i = threadIdx.x + j * kWgThreads;
      if (kZTotal % kWgThreads == 0 || i < kZTotal) {
        cp_async16_zfill(z_s + i * 8, zsrc + min(i, valid_pieces - 1) * 8, i < valid_pieces);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = crow + 16 * h;
      const bool valid = m_next[h].x >= 0 && ccol_ok;
      const int64_t src = valid ? int64_t(m_next[h].y) * I + ccol : 0;
      bf16* dst = rows_s + r * kWgColStride + cpiece * 8;
      cp_async16_zfill(dst, G + src, valid);
      cp_async16_zfill(dst + kWgChunk * kWgColStride, U + src, valid);
      cp_async16_zfill(dst + 2 * kWgChunk * kWgColStride, GH + src, valid);
      if (cpiece == 0) {
        q_s[r] = m_next[h].x;
        w_s[r] = __int_as_float(m_next[h].z);  // 0 past end
      }
    }
  };

  const float s = static_cast<float>(p.scale);
  const DropoutScale<float> drop(p.dropout_p, p.key);
  // ldmatrix row addresses (bytes from a stage's z): recompute (x4: pairs 0-7 / 8-15 by lane
  // / 16, ranks 0-7 / 8-15 by lane / 8 % 2) and gradients (.trans: pairs by lane / 8 % 2, ranks
  // by lane / 16).
  const uint32_t za_off = ((((lane / 16) * 8 + lane % 8) * kZRow) + ((lane / 8) % 2) * 8) * 2;
  const uint32_t zb_off = (((((lane / 8) % 2) * 8 + lane % 8) * kZRow) + (lane / 16) * 8) * 2;
  if (begin < end) {
    fetch_meta(begin);
    stage_chunk(0, begin);
    fetch_meta(begin + kWgChunk);
  }
  cp_async_commit();
  int st = 0;
  for (int64_t base = begin; base < end; base += kWgChunk, st ^= 1) {
    cp_async_wait<0>();
    __syncthreads();  // chunk `base` is in stage st for all; everyone is done with stage st ^ 1
    if (base + kWgChunk < end) {
      stage_chunk(st ^ 1, base + kWgChunk);
      fetch_meta(base + 2 * kWgChunk);
    }
    cp_async_commit();
    const int n = static_cast<int>(min(int64_t(kWgChunk), end - base));
    const unsigned char* S = smem + st * L::kStageBytes;
    const uint32_t z_u32 = smem_u32 + st * L::kStageBytes;
    const bf16* rows_s = reinterpret_cast<const bf16*>(S + L::kZBytes);
    const int* q_s = reinterpret_cast<const int*>(S + L::kZBytes + L::kRowBytes);
    const float* w_s = reinterpret_cast<const float*>(q_s + kWgChunk);
    for (int p0 = 0; p0 < n; p0 += 16) {  // 16 pairs: rows p0 .. p0 + 15 of the chunk
      // Recompute: lg, lu, ag [n-tile of 8 pairs][c0 (col0, pair 2c), c1 (col0, 2c + 1),
      // c2 (col0 + 1, 2c), c3 (col0 + 1, 2c + 1)]. ldmatrix (x4): matrices (pairs 0-7, ranks
      // 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) of the k-step = b0, b1 of n-tiles 0, 1.
      float lg[2][4] = {}, lu[2][4] = {}, ag[2][4] = {};
      const uint32_t za = z_u32 + za_off + p0 * kZRow * 2;
#pragma unroll
      for (int kc = 0; kc < R16; ++kc) {
        uint32_t b[4];
        if (has.g) {
          ldmatrix_x4(b, za + (kZg * RS + kc * 16) * 2);
          mma_bf16(lg[0], bg_a[kc], b[0], b[1]);
          mma_bf16(lg[1], bg_a[kc], b[2], b[3]);
        }
        if (has.u) {
          ldmatrix_x4(b, za + (kZu * RS + kc * 16) * 2);
          mma_bf16(lu[0], bu_a[kc], b[0], b[1]);
          mma_bf16(lu[1], bu_a[kc], b[2], b[3]);
        }
        if (has.gzd) {
          ldmatrix_x4(b, za + (kGzHi * RS + kc * 16) * 2);
          mma_bf16(ag[0], ad_a[kc], b[0], b[1]);
          mma_bf16(ag[1], ad_a[kc], b[2], b[3]);
        }
      }

      // Elementwise: dg, du (split) and m h (rounded) in the accumulator layout, as the A
      // fragments of the gradient MMAs (a0 = (col0; pairs 2c, 2c + 1 of n-tile 0), a1 =
      // (col0 + 1; same), a2, a3 = the same for n-tile 1).
      uint32_t dg_hi[4], dg_lo[4], du_hi[4], du_lo[4], mh_b[4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int pr = p0 + nt * 8 + 2 * c;  // this thread's pair rows pr, pr + 1
        const bf16* at = rows_s + pr * kWgColStride + warp * 16 + 2 * g;
        float Gv[4], Uv[4], Hv[4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {  // pair row pr + j: (col0, col0 + 1) -> v = j, 2 + j
          const float2 Gp = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
              at + j * kWgColStride));
          const float2 Up = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
              at + (kWgChunk + j) * kWgColStride));
          const float2 Hp = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
              at + (2 * kWgChunk + j) * kWgColStride));
          Gv[j] = Gp.x, Gv[2 + j] = Gp.y;
          Uv[j] = Up.x, Uv[2 + j] = Up.y;
          Hv[j] = Hp.x, Hv[2 + j] = Hp.y;
        }
        const float2 wv = *reinterpret_cast<const float2*>(w_s + pr);
        float dg[4], du[4], mh[4];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const float gv = has.g ? Gv[v] + s * lg[nt][v] : Gv[v];
          const float uv = has.u ? Uv[v] + s * lu[nt][v] : Uv[v];
          const ActValue<float> act = activation_at<ACT>(p.activation, gv);
          float m = 1.f;
          if constexpr (DROP) m = drop.factor(int64_t(q_s[pr + (v & 1)]) * I + col0 + (v >> 1));
          float dh = ((v & 1) ? wv.y : wv.x) * Hv[v];
          if (has.gzd) dh += m * ag[nt][v];
          dg[v] = dh * uv * act.da;
          du[v] = dh * act.a;
          mh[v] = m * (act.a * uv);
        }
        split_trunc_bf16x2(dg[0], dg[1], dg_hi[2 * nt], dg_lo[2 * nt]);
        split_trunc_bf16x2(dg[2], dg[3], dg_hi[2 * nt + 1], dg_lo[2 * nt + 1]);
        split_trunc_bf16x2(du[0], du[1], du_hi[2 * nt], du_lo[2 * nt]);
        split_trunc_bf16x2(du[2], du[3], du_hi[2 * nt + 1], du_lo[2 * nt + 1]);
        mh_b[2 * nt] = pack_bf16x2(__floats2bfloat162_rn(mh[0], mh[1]));
        mh_b[2 * nt + 1] = pack_bf16x2(__floats2bfloat162_rn(mh[2], mh[3]));
      }

      // Gradients: acc[rank n-tile] += X^T [cols, 16 pairs] @ z [16 pairs, 8 ranks].
      // ldmatrix.trans (x4): matrices (pairs 0-7, ranks 0-7), (8-15, 0-7), (0-7, 8-15),
      // (8-15, 8-15) of a 16-rank block = b0, b1 of rank n-tiles 2 rb, 2 rb + 1.
      const uint32_t zb = z_u32 + zb_off + p0 * kZRow * 2;
      // x_hi x z + x_lo x z (dBg, dBu: one z term), or x x z_hi + x x z_lo (dAd: x = m h,
      // z = grad_zd's two terms): the same MMAs with the roles of the terms swapped.
      auto grad_mma = [&](float (&acc)[2 * R16][4], const uint32_t (&x0)[4], const uint32_t (&x1)[4],
                          int term0, int term1) {
#pragma unroll
        for (int rb = 0; rb < R16; ++rb) {
          uint32_t b0[4], b1[4];
          ldmatrix_x4<true>(b0, zb + (term0 * RS + rb * 16) * 2);
          ldmatrix_x4<true>(b1, zb + (term1 * RS + rb * 16) * 2);
          mma_bf16(acc[2 * rb], x0, b0[0], b0[1]);
          mma_bf16(acc[2 * rb + 1], x0, b0[2], b0[3]);
          mma_bf16(acc[2 * rb], x1, b1[0], b1[1]);
          mma_bf16(acc[2 * rb + 1], x1, b1[2], b1[3]);
        }
      };
      if (has.g) grad_mma(acc_g, dg_hi, dg_lo, kZg, kZg);
      if (has.u) grad_mma(acc_u, du_hi, du_lo, kZu, kZu);
      if (has.gzd) grad_mma(acc_d, mh_b, mh_b, kGzHi, kGzLo);
    }
  }

  // acc[rank n-tile rt][v]: column col0 + (v >> 1), rank 8 rt + 2c + (v & 1).
  if (col0 >= I) return;
  const int64_t R3 = p.Rg + p.Ru + p.Rd;
  float* ws = static_cast<float*>(p.workspace) + (split * p.E + e) * R3 * I;
#pragma unroll
  for (int rt = 0; rt < 2 * R16; ++rt) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t col = col0 + (v >> 1), r = rt * 8 + 2 * c + (v & 1);
      if (r < p.Rg) {
        if (splits == 1) {
          static_cast<bf16*>(p.dBg)[(e * I + col) * p.Rg + r] =
              __float2bfloat16_rn(s * acc_g[rt][v]);
        } else {
          ws[r * I + col] = acc_g[rt][v];
        }
      }
      if (r < p.Ru) {
        if (splits == 1) {
          static_cast<bf16*>(p.dBu)[(e * I + col) * p.Ru + r] =
              __float2bfloat16_rn(s * acc_u[rt][v]);
        } else {
          ws[(p.Rg + r) * I + col] = acc_u[rt][v];
        }
      }
    }
    // dAd[e, r, col0 .. col0 + 1]: one bf16 pair per rank (I even, col0 even).
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t r = rt * 8 + 2 * c + v;
      if (r >= p.Rd) continue;
      if (splits == 1) {
        *reinterpret_cast<__nv_bfloat162*>(static_cast<bf16*>(p.dAd) + (e * p.Rd + r) * I + col0) =
            __floats2bfloat162_rn(acc_d[rt][v], acc_d[rt][2 + v]);
      } else {
        *reinterpret_cast<float2*>(ws + (p.Rg + p.Ru + r) * I + col0) =
            make_float2(acc_d[rt][v], acc_d[rt][2 + v]);
      }
    }
  }
}

int wgrad_r16(const MoeSwigluBackwardParams& p) {
  return static_cast<int>((std::max({p.Rg, p.Ru, p.Rd}) + 15) / 16);  // 1 .. 4 (<= kWgMaxRank)
}

// Bytes of wgrad_split_z_kernel's output in the workspace (after any partials): meta, then zs.
int64_t wgrad_zs_bytes(const MoeSwigluBackwardParams& p) {
  const int64_t N = p.T * p.k;
  return N * (16 + int64_t(wgrad_zrow(wgrad_r16(p))) * 2);
}

int64_t wgrad_col_tiles(int64_t I) { return (I + kWgCols - 1) / kWgCols; }


}  // namespace

bool wgrad_mma_supported(const MoeSwigluBackwardParams& p) {
  if (p.dtype != DType::kBFloat16) return false;
  if (p.E < 1 || p.I < 1 || p.I % 8 != 0 || p.T < 0 || p.k < 1) return false;
  const int64_t max_rank = std::max({p.Rg, p.Ru, p.Rd});
  if (max_rank < 1 || max_rank > kWgMaxRank) return false;
  if (wgrad_col_tiles(p.I) > 65535 || p.E * kWgMaxSplits > (int64_t(1) << 31) - 1) return false;
  for (const void* ptr : {p.G, p.U, p.grad_hbar}) {  // 16-byte cp.async of row pieces
    if (!aligned16(ptr)) return false;
  }
  // dAd stored as bf16 pairs (col0 even, I even); the glue's outputs are fresh allocations.
  if (!aligned_to(p.dAd, 4)) return false;
  // The split z terms live in the workspace: within one [T, I] activation's bytes.
  if (wgrad_zs_bytes(p) > p.T * p.I * 2) return false;
  return device_has_mma();
}

// Pair splits: enough blocks to fill the device several times over (kWgTargetBlocks, from the
// shapes alone), about two chunks or more per split and expert on average, and the partials
// plus the split z terms within one [T, I] activation's bytes.
int64_t wgrad_mma_splits(const MoeSwigluBackwardParams& p) {
  const int64_t E = std::max<int64_t>(p.E, 1);
  const int64_t blocks = wgrad_col_tiles(p.I) * E;
  const int64_t fill = (kWgTargetBlocks + blocks - 1) / blocks;
  const int64_t by_pairs = p.T * p.k / (E * 2 * kWgChunk);
  const int64_t partial_bytes = E * (p.Rg + p.Ru + p.Rd) * p.I * 4;
  const int64_t budget = p.T * p.I * 2 - wgrad_zs_bytes(p);
  const int64_t by_memory = partial_bytes > 0 ? budget / partial_bytes : 1;
  return std::max<int64_t>(1, std::min({int64_t(kWgMaxSplits), fill, by_pairs, by_memory}));
}

int64_t wgrad_mma_workspace_elems(const MoeSwigluBackwardParams& p) {
  const int64_t splits = wgrad_mma_splits(p);
  const int64_t partials = splits > 1 ? splits * p.E * (p.Rg + p.Ru + p.Rd) * p.I : 0;
  return partials + (wgrad_zs_bytes(p) + 3) / 4;
}

cudaError_t launch_moe_swiglu_wgrad_mma(const MoeSwigluBackwardParams& p, int64_t splits,
                                        cudaStream_t stream) {
  const int64_t N = p.T * p.k;
  const int r16 = wgrad_r16(p);
  const int64_t partials = splits > 1 ? splits * p.E * (p.Rg + p.Ru + p.Rd) * p.I : 0;
  int4* meta = reinterpret_cast<int4*>(static_cast<float*>(p.workspace) + partials);
  bf16* zs = reinterpret_cast<bf16*>(meta + N);
  if (N > 0) {
    const int64_t threads = N * (wgrad_rs(r16) / 2);  // (pos, rank pair)
    const unsigned blocks =
        static_cast<unsigned>((threads + kWgSplitThreads - 1) / kWgSplitThreads);
    switch (r16) {
      case 1:
        wgrad_split_z_kernel<WgLayout<1>::RS><<<blocks, kWgSplitThreads, 0, stream>>>(p, zs, meta);
        break;
      case 2:
        wgrad_split_z_kernel<WgLayout<2>::RS><<<blocks, kWgSplitThreads, 0, stream>>>(p, zs, meta);
        break;
      case 3:
        wgrad_split_z_kernel<WgLayout<3>::RS><<<blocks, kWgSplitThreads, 0, stream>>>(p, zs, meta);
        break;
      default:
        wgrad_split_z_kernel<WgLayout<4>::RS><<<blocks, kWgSplitThreads, 0, stream>>>(p, zs, meta);
        break;
    }
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
  }
  const dim3 grid(static_cast<unsigned>(p.E * splits), static_cast<unsigned>(wgrad_col_tiles(p.I)));
  auto launch = [&](auto kernel, size_t smem) {
    const cudaError_t err = allow_dynamic_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kWgThreads, smem, stream>>>(p, zs, meta, splits);
    MIXLORA_RETURN_IF_LAUNCH_FAILED();
    return cudaSuccess;
  };
  // R16 (1 .. 4) x activation (the fast SiLU or any) x dropout (off or on).
  auto with_act = [&](auto r16_c) {
    constexpr int R16 = decltype(r16_c)::value;
    constexpr size_t smem = WgLayout<R16>::kSmem;
    const bool drop = p.dropout_p > 0;
    if (p.activation == kSilu) {
      return drop ? launch(moe_swiglu_wgrad_mma_kernel<R16, kSilu, true>, smem)
                  : launch(moe_swiglu_wgrad_mma_kernel<R16, kSilu, false>, smem);
    }
    return drop ? launch(moe_swiglu_wgrad_mma_kernel<R16, kAnyActivation, true>, smem)
                : launch(moe_swiglu_wgrad_mma_kernel<R16, kAnyActivation, false>, smem);
  };
  switch (r16) {
    case 1: return with_act(std::integral_constant<int, 1>{});
    case 2: return with_act(std::integral_constant<int, 2>{});
    case 3: return with_act(std::integral_constant<int, 3>{});
    default: return with_act(std::integral_constant<int, 4>{});
  }
}

}  // namespace cuda
}  // namespace mixlora
