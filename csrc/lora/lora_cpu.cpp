// CPU kernels of the low-rank expert GEMMs and the LoRA-dropout mask (docs/design.md,
// "Low-rank expert GEMMs").
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/dropout_rng.h"
#include "lora/lora_args.h"

namespace mixlora {
namespace {

// drop_q(x_row) in acc: row x_row of width D under pair q's mask.
template <typename acc_t, typename scalar_t>
void drop_row(const DropoutScale<acc_t>& drop, const scalar_t* x_row, int64_t D, int64_t q,
              acc_t* out) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(x_row[d]) * drop.factor(q * D + d);
}

// One task per pair q = t*k + j: it owns z[q], computed from x[t] under the pair's dropout mask
// and from A[ids[q]].
at::Tensor lora_shrink_cpu(const at::Tensor& x_in, const at::Tensor& A_in,
                           const at::Tensor& ids_in, double dropout_p, int64_t seed,
                           int64_t stream) {
  check_lora_shrink(x_in, A_in, ids_in, dropout_p);
  const auto x = x_in.contiguous();
  const auto A = A_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), k = ids.size(1);
  check_index_values("ids", ids, E);
  auto z = at::empty({T, k, R}, x.options().dtype(acc_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();  // [T, D]
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();  // [E, R, D]
    const int32_t* id = ids.const_data_ptr<int32_t>();  // [N]
    acc_t* zp = z.data_ptr<acc_t>();                    // [N, R]
    const DropoutScale<acc_t> drop(dropout_p, dropout_key(seed, stream));
    at::parallel_for(0, T * k, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_drop(D);  // drop_q(x[t])
      for (int64_t q = begin; q < end; ++q) {
        drop_row(drop, xp + (q / k) * D, D, q, x_drop.data());
        const scalar_t* A_e = Ap + id[q] * R * D;
        for (int64_t r = 0; r < R; ++r) {
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(A_e[r * D + d]) * x_drop[d];
          zp[q * R + r] = sum;
        }
      }
    });
  });
  return z;
}

// One task per token t: it owns y[t] and sums its k pairs in j order.
at::Tensor lora_expand_cpu(const at::Tensor& z_in, const at::Tensor& B_in,
                           const at::Tensor& ids_in, const std::optional<at::Tensor>& coef_in,
                           double dropout_p, int64_t seed, int64_t stream) {
  check_lora_expand(z_in, B_in, ids_in, coef_in, dropout_p);
  const auto z = z_in.contiguous();
  const auto B = B_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto coef = coef_in.has_value() ? coef_in->contiguous() : at::Tensor();
  const int64_t T = z.size(0), k = z.size(1), E = B.size(0), D = B.size(1), R = B.size(2);
  check_index_values("ids", ids, E);
  auto y = at::empty({T, D}, B.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "lora_expand", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* zp = z.const_data_ptr<acc_t>();                                  // [N, R]
    const scalar_t* Bp = B.const_data_ptr<scalar_t>();                            // [E, D, R]
    const int32_t* id = ids.const_data_ptr<int32_t>();                            // [N]
    const acc_t* c = coef.defined() ? coef.const_data_ptr<acc_t>() : nullptr;  // [N]
    scalar_t* yp = y.data_ptr<scalar_t>();                                        // [T, D]
    const DropoutScale<acc_t> drop(dropout_p, dropout_key(seed, stream));
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t d = 0; d < D; ++d) {
          acc_t sum = 0;
          for (int64_t q = t * k; q < (t + 1) * k; ++q) {
            const scalar_t* B_row = Bp + (id[q] * D + d) * R;
            acc_t bz = 0;
            for (int64_t r = 0; r < R; ++r) bz += static_cast<acc_t>(B_row[r]) * zp[q * R + r];
            sum += (c != nullptr ? c[q] : acc_t(1)) * drop.factor(q * D + d) * bz;
          }
          yp[t * D + d] = static_cast<scalar_t>(sum);
        }
      }
    });
  });
  return y;
}

// One task per expert e: it owns out[e] and adds up e's pairs in sorted order, so each element
// is one sequential sum whatever the number of threads.
at::Tensor lora_weight_grad_cpu(const at::Tensor& z_in, const at::Tensor& x_in,
                                const at::Tensor& order_in, const at::Tensor& offsets_in,
                                const std::optional<at::Tensor>& coef_in, double dropout_p,
                                int64_t seed, int64_t stream) {
  check_lora_weight_grad(z_in, x_in, order_in, offsets_in, coef_in, dropout_p);
  const auto z = z_in.contiguous();
  const auto x = x_in.contiguous();
  const auto order = order_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const auto coef = coef_in.has_value() ? coef_in->contiguous() : at::Tensor();
  const int64_t T = x.size(0), D = x.size(1), k = z.size(1), R = z.size(2);
  const int64_t E = offsets.size(0) - 1;
  check_index_values("order", order, T * k);
  check_offsets_values(offsets, T * k);
  auto out = at::zeros({E, R, D}, z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* zp = z.const_data_ptr<acc_t>();                                  // [N, R]
    const scalar_t* xp = x.const_data_ptr<scalar_t>();                            // [T, D]
    const int32_t* ord = order.const_data_ptr<int32_t>();                         // [N]
    const int64_t* off = offsets.const_data_ptr<int64_t>();                       // [E + 1]
    const acc_t* c = coef.defined() ? coef.const_data_ptr<acc_t>() : nullptr;  // [N]
    acc_t* o = out.data_ptr<acc_t>();                                             // [E, R, D]
    const DropoutScale<acc_t> drop(dropout_p, dropout_key(seed, stream));
    at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_drop(D);  // drop_q(x[t])
      for (int64_t e = begin; e < end; ++e) {
        for (int64_t p = off[e]; p < off[e + 1]; ++p) {
          const int64_t q = ord[p];
          drop_row(drop, xp + (q / k) * D, D, q, x_drop.data());
          for (int64_t r = 0; r < R; ++r) {
            const acc_t cz = (c != nullptr ? c[q] : acc_t(1)) * zp[q * R + r];
            acc_t* o_row = o + (e * R + r) * D;
            for (int64_t d = 0; d < D; ++d) o_row[d] += cz * x_drop[d];
          }
        }
      }
    });
  });
  return out;
}

// One task per chunk of mask elements: each element is an independent hash of its index.
at::Tensor dropout_mask_cpu(const at::Tensor& like, int64_t seed, int64_t stream, int64_t rows,
                            int64_t cols, double p) {
  check_dropout_mask(rows, cols, p);
  auto mask = at::empty({rows, cols}, like.options().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const uint64_t key = dropout_key(seed, stream);
  at::parallel_for(0, rows * cols, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) m[i] = dropout_keep(key, i, p);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CPU, m) {
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_expand", &lora_expand_cpu);
  m.impl("lora_weight_grad", &lora_weight_grad_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

}  // namespace mixlora
