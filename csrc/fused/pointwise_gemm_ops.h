// The 1x1 convolution policy of the CUDA fused ops, templated on where its programs run:
// `Launcher` runs the BN thread programs and `BlockLauncher` the GEMM block programs
// (pointwise_gemm_programs.h). CudaLauncher + CudaBlockLauncher is the CUDA op; CpuLauncher +
// HostBlockLauncher is its host twin, the test-only depsep_host::pointwise_bn_act_*, which runs
// the same code path on the host so that tests execute it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/version.h>

#include <cstdint>
#include <tuple>

#include "fused/conv_policies.h"
#include "fused/pointwise_gemm_programs.h"

namespace depsep {

// Whether float32 convolutions may run in TF32: torch.backends.cudnn.conv.fp32_precision
// ("tf32" by default), torch.backends.cudnn.allow_tf32 before torch 2.9. The query without an
// operator raises once conv and RNN precisions differ, so it is not used where the per-op one
// exists.
inline bool conv_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().allowTF32CuDNN("conv");
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

// The GEMM block programs in channels_last for float16, bfloat16, and float32 when TF32 is
// allowed for convolutions (as for the cuDNN reference); ATen's GEMM and the BN thread programs
// otherwise (float64, NCHW, float32 without TF32). Backward as PointwiseConv.
template <typename Launcher, typename BlockLauncher>
struct PointwiseFusedConv : PointwiseConv {
  static constexpr bool kFusesBn = true;

  std::tuple<at::Tensor, at::Tensor> forward_bn_act(const at::Tensor& input,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& gamma, const at::Tensor& beta,
                                                    const at::Tensor& running_mean,
                                                    const at::Tensor& running_var, bool training,
                                                    double eps, int32_t act) const {
    const auto dtype = input.scalar_type();
    const bool tensor_cores =
        dtype == at::kHalf || dtype == at::kBFloat16 || (dtype == at::kFloat && conv_allows_tf32());
    if (!tensor_cores || !channels_last(input)) {
      at::Tensor y = forward(input, weight);
      TORCH_CHECK(y.numel() > 0, "depsep: the fused ops need a non-empty input");
      at::Tensor stats = BnActPasses<Launcher>::forward(y, gamma, beta, running_mean, running_var,
                                                        training, eps, act);
      return {y, stats};
    }
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).contiguous();
    at::Tensor out = output_like(x, w.size(0));
    const int64_t M = x.size(0) * x.size(2) * x.size(3);
    TORCH_CHECK(M > 0, "depsep: the fused ops need a non-empty input");
    const int64_t rows_per_block = pw_stats_rows_per_block(M);
    const int64_t chunks = training ? (M + rows_per_block - 1) / rows_per_block : 0;
    BnVectors bn(w.size(0), x);
    const at::Tensor partial =
        training ? at::empty({chunks, 3, w.size(0)}, bn.options()) : at::Tensor();
    const bool aligned = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 == 0;
    const auto run = [&](auto type_tag) {
      using scalar_t = decltype(type_tag);
      PwGemmArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                w.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(),
                                training ? partial.mutable_data_ptr<float>() : nullptr,
                                nullptr,
                                nullptr,
                                M,
                                rows_per_block,
                                static_cast<int32_t>(x.size(1)),
                                static_cast<int32_t>(w.size(0)),
                                act,
                                x.size(1) % (16 / x.element_size()) == 0 && aligned};
      if (training) {
        using Statistics = PwGemmProgram<scalar_t, true>;
        BlockLauncher::template launch<Statistics>(args, Statistics::grid(args));
      }
      bn_reduce<Launcher>(bn, partial, running_mean, running_var, gamma, beta, eps);
      args.scale = bn.scale<float>();
      args.shift = bn.shift<float>();
      using Apply = PwGemmProgram<scalar_t, false>;
      BlockLauncher::template launch<Apply>(args, Apply::grid(args));
    };
    if (dtype == at::kHalf)
      run(c10::Half());
    else if (dtype == at::kBFloat16)
      run(c10::BFloat16());
    else
      run(float());
    return {out, bn.stats};
  }
};

}  // namespace depsep
