// The per-element math of the fused SwiGLU, shared by the CPU and CUDA kernels so that the
// forward, the backward and both backends recompute g, u, h and their gradients identically.
// Plain C++ (no torch headers): CUDA kernel files include it under nvcc.
#pragma once
#include <cstdint>

#include "common/activation.h"
#include "common/host_device.h"

namespace mixlora {

// g, u and what the backward needs of them at one (pair, column).
template <typename acc_t>
struct SwigluPoint {
  acc_t g;      // gate pre-activation
  acc_t u;      // up projection
  acc_t act_g;  // act(g)
  acc_t h;      // act(g) * u
};

// sum_r B_row[r] * z[r]: one column of the low-rank update B[e] @ z_q (B_row = B[e, i, :]).
template <typename acc_t, typename scalar_t>
MIXLORA_HD acc_t lora_row_dot(const scalar_t* B_row, const acc_t* z, int64_t R) {
  acc_t sum = 0;
  for (int64_t r = 0; r < R; ++r) sum += static_cast<acc_t>(B_row[r]) * z[r];
  return sum;
}

// g = G + s * Bg_row . zg (just G without Bg), u likewise, h = act(g) * u; Bg_row / Bu_row
// may be null.
template <typename acc_t, typename scalar_t>
MIXLORA_HD SwigluPoint<acc_t> swiglu_point(int act, acc_t s, scalar_t G, scalar_t U,
                                           const scalar_t* Bg_row, const acc_t* zg, int64_t Rg,
                                           const scalar_t* Bu_row, const acc_t* zu, int64_t Ru) {
  SwigluPoint<acc_t> pt;
  pt.g = static_cast<acc_t>(G);
  if (Bg_row != nullptr) pt.g += s * lora_row_dot(Bg_row, zg, Rg);
  pt.u = static_cast<acc_t>(U);
  if (Bu_row != nullptr) pt.u += s * lora_row_dot(Bu_row, zu, Ru);
  pt.act_g = activate(act, pt.g);
  pt.h = pt.act_g * pt.u;
  return pt;
}

// dg = dh * u * act'(g), du = dh * act(g).
template <typename acc_t>
MIXLORA_HD void swiglu_point_grad(int act, const SwigluPoint<acc_t>& pt, acc_t dh, acc_t* dg,
                                  acc_t* du) {
  *dg = dh * pt.u * activate_grad(act, pt.g);
  *du = dh * pt.act_g;
}

// dh = w * grad_hbar + m * sum_r Ad[e, r, i] * grad_zd[q, r]: the gradient of h at one
// (pair, column). Ad_col = &Ad[e, 0, i] (stride I between ranks); null when grad_zd is absent.
template <typename acc_t, typename scalar_t>
MIXLORA_HD acc_t swiglu_dh(acc_t w, acc_t grad_hbar, acc_t m, const scalar_t* Ad_col,
                           int64_t I, const acc_t* grad_zd, int64_t Rd) {
  acc_t dh = w * grad_hbar;
  if (Ad_col != nullptr) {
    acc_t ad_gz = 0;
    for (int64_t r = 0; r < Rd; ++r) ad_gz += static_cast<acc_t>(Ad_col[r * I]) * grad_zd[r];
    dh += m * ad_gz;
  }
  return dh;
}

}  // namespace mixlora
