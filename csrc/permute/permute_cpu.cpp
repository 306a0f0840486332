// CPU kernels of the permutation ops (docs/design.md, "Permutation").
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "permute/permute_args.h"

namespace mixlora {
namespace {

// One thread: a counting sort (histogram, exclusive prefix sum, stable scatter) in O(N + E).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_pairs_cpu(const at::Tensor& ids_in,
                                                              int64_t num_experts) {
  check_sort_pairs(ids_in, num_experts);
  const auto ids = ids_in.contiguous();
  const int64_t N = ids.numel(), E = num_experts;
  check_index_values("ids", ids, E);
  auto order = at::empty({N}, ids.options());
  auto offsets = at::zeros({E + 1}, ids.options().dtype(at::kLong));
  auto position = at::empty({N}, ids.options());
  const int32_t* id = ids.const_data_ptr<int32_t>();  // [N]
  int32_t* ord = order.data_ptr<int32_t>();           // [N]
  int64_t* off = offsets.data_ptr<int64_t>();         // [E + 1]
  int32_t* pos = position.data_ptr<int32_t>();        // [N]
  for (int64_t q = 0; q < N; ++q) ++off[id[q] + 1];
  for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::vector<int64_t> next(off, off + E);  // the next free slot of each expert
  for (int64_t q = 0; q < N; ++q) {
    const int64_t p = next[id[q]]++;
    ord[p] = static_cast<int32_t>(q);
    pos[q] = static_cast<int32_t>(p);
  }
  return {order, offsets, position};
}

// One task per output row p: it reads source row order[p] / k and writes only row p.
at::Tensor gather_pairs_cpu(const at::Tensor& src_in, const at::Tensor& order_in, int64_t k,
                            const std::optional<at::Tensor>& weights_in) {
  check_gather_pairs(src_in, order_in, k, weights_in);
  const auto src = src_in.contiguous();
  const auto order = order_in.contiguous();
  const auto weights = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  const int64_t T = src.size(0), D = src.size(1), N = T * k;
  check_index_values("order", order, N);
  auto out = at::empty({N, D}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gather_pairs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = src.const_data_ptr<scalar_t>();                              // [T, D]
    const int32_t* ord = order.const_data_ptr<int32_t>();                            // [N]
    const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;  // [N]
    scalar_t* o = out.data_ptr<scalar_t>();                                          // [N, D]
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t q = ord[p];
        const acc_t wq = w != nullptr ? w[q] : acc_t(1);
        const scalar_t* row = s + (q / k) * D;
        for (int64_t d = 0; d < D; ++d) {
          o[p * D + d] = static_cast<scalar_t>(wq * static_cast<acc_t>(row[d]));
        }
      }
    });
  });
  return out;
}

// One task per token t: it owns out[t] and sums its k source rows in j order (no atomics).
at::Tensor scatter_pairs_cpu(const at::Tensor& src_in, const at::Tensor& position_in, int64_t k,
                             const std::optional<at::Tensor>& weights_in) {
  check_scatter_pairs(src_in, position_in, k, weights_in);
  const auto src = src_in.contiguous();
  const auto position = position_in.contiguous();
  const auto weights = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  const int64_t N = src.size(0), D = src.size(1), T = N / k;
  check_index_values("position", position, N);
  auto out = at::empty({T, D}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_pairs", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = src.const_data_ptr<scalar_t>();                              // [N, D]
    const int32_t* pos = position.const_data_ptr<int32_t>();                         // [N]
    const acc_t* w = weights.defined() ? weights.const_data_ptr<acc_t>() : nullptr;  // [T, k]
    scalar_t* o = out.data_ptr<scalar_t>();                                          // [T, D]
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t d = 0; d < D; ++d) {
          acc_t sum = 0;
          for (int64_t q = t * k; q < (t + 1) * k; ++q) {
            const acc_t wq = w != nullptr ? w[q] : acc_t(1);
            sum += wq * static_cast<acc_t>(s[pos[q] * D + d]);
          }
          o[t * D + d] = static_cast<scalar_t>(sum);
        }
      }
    });
  });
  return out;
}

// One task per pair q = t*k + j: the dot product of dense[t] and paired[position[q]].
at::Tensor pair_dot_cpu(const at::Tensor& dense_in, const at::Tensor& paired_in,
                        const at::Tensor& position_in, int64_t k) {
  check_pair_dot(dense_in, paired_in, position_in, k);
  const auto dense = dense_in.contiguous();
  const auto paired = paired_in.contiguous();
  const auto position = position_in.contiguous();
  const int64_t T = dense.size(0), D = dense.size(1), N = T * k;
  check_index_values("position", position, N);
  auto out = at::empty({T, k}, dense.options().dtype(acc_type(dense.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "pair_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = dense.const_data_ptr<scalar_t>();     // [T, D]
    const scalar_t* b = paired.const_data_ptr<scalar_t>();    // [N, D]
    const int32_t* pos = position.const_data_ptr<int32_t>();  // [N]
    acc_t* o = out.data_ptr<acc_t>();                         // [T, k]
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* a_row = a + (q / k) * D;
        const scalar_t* b_row = b + pos[q] * D;
        acc_t sum = 0;
        for (int64_t d = 0; d < D; ++d) {
          sum += static_cast<acc_t>(a_row[d]) * static_cast<acc_t>(b_row[d]);
        }
        o[q] = sum;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixlora, CPU, m) {
  m.impl("sort_pairs", &sort_pairs_cpu);
  m.impl("gather_pairs", &gather_pairs_cpu);
  m.impl("scatter_pairs", &scatter_pairs_cpu);
  m.impl("pair_dot", &pair_dot_cpu);
}

}  // namespace mixlora
