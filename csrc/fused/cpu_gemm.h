// The 1x1 convolution of the native CPU fused ops: PointwiseConv with channels_last float and
// float64 GEMMs called on the tensors' memory directly, through the BLAS that ATen's own CPU
// GEMM calls (the sgemm_/dgemm_ that libtorch_cpu exports), so the results are ATen's. A tiny
// layer's host cost is mostly the dispatch of the ATen calls around its GEMM (the views that
// make rows of a channels_last tensor, the transposed weight, mm itself: about a microsecond
// each), which this skips. Large float32 layers of few input channels take ATen's convolution
// instead (oneDNN's, as eager PyTorch runs them), which beats the BLAS GEMM there. Without the
// BLAS symbols (a torch built without BLAS) or past the BLAS's 32-bit sizes it is PointwiseConv.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "fused/conv_policies.h"

extern "C" {
// Weak: a torch built without a BLAS leaves them null, and the ATen path runs instead.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace depsep {

// Column-major C[m, n] = op(A)[m, k] * op(B)[k, n] (beta = 0), as BLAS takes it.
template <typename T>
void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb);
  const int ildc = static_cast<int>(ldc);
  const T one = T(1), zero = T(0);
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &zero, c, &ildc);
  else
    dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &zero, c, &ildc);
}

template <typename T>
bool has_blas() {
  return std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// out rows [rows, n] = a rows [rows, k] * w^T, with w [n, k] row-major (a 1x1 weight): the
// BLAS GEMM where there is one (within its int sizes), else ATen's mm on the same memory.
template <typename T>
void rows_times_weight(const T* a, const T* w, T* out, int64_t rows, int64_t k, int64_t n,
                       const at::TensorOptions& options) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (has_blas<T>() && rows <= kMax && k <= kMax && n <= kMax) {
    // Column-major out^T [n, rows] = w^T' [n, k] * a^T [k, rows].
    blas_gemm<T>(true, false, n, rows, k, w, k, a, k, out, n);
    return;
  }
  at::Tensor y = at::from_blob(out, {rows, n}, options);
  at::mm_out(y, at::from_blob(const_cast<T*>(a), {rows, k}, options),
             at::from_blob(const_cast<T*>(w), {n, k}, options).t());
}

// Whether ATen's convolution (oneDNN) beats the BLAS GEMM for a float32 1x1 layer of P pixels.
// Measured on this project's 2-core AVX2 machine over the MobileNet V1 1x1 layers at batch 2
// and 8, channels_last, forward and backward: 1.1-2.1x faster from 2^24 multiply-adds with up to
// 256 input channels, about even from 512; below 2^24 its per-call cost (~30 us) loses.
inline bool onednn_pays(at::ScalarType type, int64_t P, int64_t C_in, int64_t C_out) {
  constexpr int64_t kMinMacs = int64_t(1) << 24, kMaxInChannels = 256;
  return type == at::kFloat && C_in <= kMaxInChannels && P * C_in * C_out >= kMinMacs &&
         at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// ATen's 1x1 convolution and its gradients, as eager PyTorch computes them.
inline at::Tensor aten_pointwise(const at::Tensor& input, const at::Tensor& weight) {
  return at::convolution(input, weight, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
}

struct PointwiseCpuConv : PointwiseConv {
  // Whether the direct GEMMs take these tensors: channels_last rows of float or float64, a
  // contiguous weight, dimensions within BLAS's int (as ATen's own check).
  static bool direct(const at::Tensor& x, const at::Tensor& weight) {
    const at::ScalarType t = x.scalar_type();
    if (t == at::kFloat ? sgemm_ == nullptr : (t != at::kDouble || dgemm_ == nullptr)) return false;
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    return channels_last(x) && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
           weight.is_contiguous() && x.size(0) * x.size(2) * x.size(3) <= kMax &&
           x.size(1) <= kMax && weight.size(0) <= kMax;
  }

  static bool onednn(const at::Tensor& x, const at::Tensor& weight) {
    return onednn_pays(x.scalar_type(), x.size(0) * x.size(2) * x.size(3), x.size(1),
                       weight.size(0));
  }

  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight) const {
    if (!direct(input, weight)) return PointwiseConv::forward(input, weight);
    if (onednn(input, weight)) return aten_pointwise(input, weight);
    const int64_t P = input.size(0) * input.size(2) * input.size(3);
    const int64_t C_in = input.size(1), C_out = weight.size(0);
    at::Tensor y = output_like(input, C_out);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pw_cpu_fwd", [&] {
      rows_times_weight<scalar_t>(input.const_data_ptr<scalar_t>(),
                                  weight.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                  P, C_in, C_out, input.options());
    });
    return y;
  }

  void backward(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                bool need_input, bool need_weight, at::Tensor& grad_input,
                at::Tensor& grad_weight) const {
    if (!direct(input, weight) || !grad_y.is_contiguous(at::MemoryFormat::ChannelsLast))
      return PointwiseConv::backward(grad_y, input, weight, need_input, need_weight, grad_input,
                                     grad_weight);
    if (onednn(input, weight)) {
      auto grads =
          at::convolution_backward(grad_y, input, weight, std::nullopt, {1, 1}, {0, 0}, {1, 1},
                                   false, {0, 0}, 1, {need_input, need_weight, false});
      grad_input = std::get<0>(grads);
      grad_weight = std::get<1>(grads);
      return;
    }
    const int64_t P = input.size(0) * input.size(2) * input.size(3);
    const int64_t C_in = input.size(1), C_out = weight.size(0);
    if (need_input) grad_input = output_like(input, C_in);
    if (need_weight) grad_weight = at::empty(weight.sizes(), weight.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "pw_cpu_bwd", [&] {
      const scalar_t* g = grad_y.const_data_ptr<scalar_t>();
      // grad_input rows [P, C_in] = g rows [P, C_out] * w [C_out, C_in].
      if (need_input)
        blas_gemm<scalar_t>(false, false, C_in, P, C_out, weight.const_data_ptr<scalar_t>(), C_in,
                            g, C_out, grad_input.mutable_data_ptr<scalar_t>(), C_in);
      // grad_weight [C_out, C_in] = g^T [C_out, P] * x rows [P, C_in].
      if (need_weight)
        blas_gemm<scalar_t>(false, true, C_in, C_out, P, input.const_data_ptr<scalar_t>(), C_in, g,
                            C_out, grad_weight.mutable_data_ptr<scalar_t>(), C_in);
    });
  }
};

}  // namespace depsep
