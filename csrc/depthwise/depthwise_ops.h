// Host side of the depthwise ops, shared by the CPU and CUDA registrations: argument checks,
// layout choice, output allocation and the choice of thread program. `Launcher` decides where
// the programs run: CpuLauncher loops over every thread index on the host, CudaLauncher
// launches the __global__ wrappers. Both see the same programs with the same template
// arguments, which is what makes the host run a faithful test of the GPU code.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <initializer_list>

#include "common/static_switch.h"
#include "depthwise_programs.h"

namespace depsep {

// Output positions per thread along W. Four keeps the accumulators of a 16-byte channel
// vector (4 x 8 halves, 4 x 4 floats) in registers.
constexpr int kStrip = 4;

// Which compile-time specialisation a call takes. Vector width is 16 bytes of channels in
// channels_last when C divides evenly and every tensor the program touches starts on a
// 16-byte boundary (a view with a storage offset may not), else one channel per thread.
struct DwPlan {
  bool channels_last;
  bool kernel3x3;
  bool vectorized;
};

inline DwPlan dw_plan(const DwGeometry& g, bool channels_last,
                      std::initializer_list<const at::Tensor*> tensors) {
  const int64_t vec = 16 / (*tensors.begin())->element_size();
  bool aligned = true;
  for (const at::Tensor* t : tensors)
    aligned = aligned && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
  return {channels_last, g.kH == 3 && g.kW == 3, channels_last && g.C % vec == 0 && aligned};
}

// The program specialisation for a plan: the layout, the 3x3 fast path and 16-byte channel
// vectors (channels_last only: an NCHW thread takes one channel), one bool_switch each.
template <template <typename> class Program, typename T, typename Fn>
void with_spatial_program(const DwPlan& p, Fn&& fn) {
  bool_switch(p.channels_last, [&](auto cl) {
    bool_switch(p.kernel3x3, [&](auto k3) {
      bool_switch(p.vectorized, [&](auto vec) {
        constexpr bool kCl = decltype(cl)::value;
        constexpr int kK = decltype(k3)::value ? 3 : 0;
        constexpr int kVec = kCl && decltype(vec)::value ? 16 / sizeof(T) : 1;
        fn(Program<DwKernelTraits<T, at::opmath_type<T>, kCl, kK, kK, kVec, kStrip>>{});
      });
    });
  });
}

// The weight gradient's partial-sums program for a plan (no fixed kernel size or strip).
template <typename T, typename Fn>
void with_weight_grad_program(const DwPlan& p, Fn&& fn) {
  bool_switch(p.channels_last, [&](auto cl) {
    bool_switch(p.vectorized, [&](auto vec) {
      constexpr bool kCl = decltype(cl)::value;
      constexpr int kVec = kCl && decltype(vec)::value ? 16 / sizeof(T) : 1;
      fn(DwWeightGradPartialProgram<DwKernelTraits<T, at::opmath_type<T>, kCl, 0, 0, kVec, 1>>{});
    });
  });
}

inline int64_t dw_output_size(int64_t in, int64_t pad_begin, int64_t pad_end, int64_t k,
                              int64_t stride, int64_t dilation) {
  return (in + pad_begin + pad_end - dilation * (k - 1) - 1) / stride + 1;
}

// The checks every entry point makes, so that a direct torch.ops call with bad arguments
// raises instead of reading out of bounds. The Python API validates with friendlier messages
// before it gets here.
inline DwGeometry dw_geometry(at::IntArrayRef input_shape, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  TORCH_CHECK(input_shape.size() == 4, "depsep: input must be 4-D [N, C, H, W], got ",
              input_shape.size(), "-D");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2,
              "depsep: kernel_size, stride and dilation must have 2 values");
  TORCH_CHECK(padding.size() == 4, "depsep: padding must be [top, bottom, left, right]");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "depsep: stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "depsep: dilation must be positive, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
              "depsep: padding must be non-negative, got ", padding);
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, "depsep: empty kernel ", kernel_size);
  const int64_t H = input_shape[2], W = input_shape[3];
  TORCH_CHECK(H + padding[0] + padding[1] >= dilation[0] * (kernel_size[0] - 1) + 1 &&
                  W + padding[2] + padding[3] >= dilation[1] * (kernel_size[1] - 1) + 1,
              "depsep: kernel (with dilation) larger than the padded input");
  DwGeometry g;
  g.N = input_shape[0];
  g.C = input_shape[1];
  g.H = H;
  g.W = W;
  g.kH = static_cast<int32_t>(kernel_size[0]);
  g.kW = static_cast<int32_t>(kernel_size[1]);
  g.sH = static_cast<int32_t>(stride[0]);
  g.sW = static_cast<int32_t>(stride[1]);
  g.padT = static_cast<int32_t>(padding[0]);
  g.padL = static_cast<int32_t>(padding[2]);
  g.dH = static_cast<int32_t>(dilation[0]);
  g.dW = static_cast<int32_t>(dilation[1]);
  g.OH = dw_output_size(H, padding[0], padding[1], g.kH, g.sH, g.dH);
  g.OW = dw_output_size(W, padding[2], padding[3], g.kW, g.sW, g.dW);
  return g;
}

inline void dw_check_weight(const at::Tensor& weight, const at::Tensor& like, int64_t C) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1,
              "depsep: weight must be [C, 1, kH, kW] with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == like.scalar_type() && weight.device() == like.device(),
              "depsep: weight must match the input's dtype and device");
}

// Weights are consumed tap-major ([kH*kW][C]) so a channel vector reads contiguous values.
inline at::Tensor dw_tap_major(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).t().contiguous();
}

// Pass 2 of the weight gradient: chunks summed in index order (deterministic).
template <typename Launcher, typename T, typename Acc>
void dw_reduce_weight_grad(const at::Tensor& partial, int64_t taps, int64_t C,
                           at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using R = DwWeightGradReduceProgram<T, Acc>;
  typename R::Args args{partial.const_data_ptr<Acc>(),
                        grad_weight.mutable_data_ptr<T>(),
                        grad_bias.numel() > 0 ? grad_bias.mutable_data_ptr<T>() : nullptr,
                        partial.size(0),
                        taps,
                        C};
  Launcher::template launch<R>(args, R::num_threads(taps, C));
}

// Computes with the thread programs on `Launcher` (CpuLauncher: the host run; CudaLauncher:
// the GPU). The op bodies below hand it tensors already laid out in `compute_format`.
template <typename Launcher>
struct ProgramCompute {
  using DeviceGuard = typename Launcher::DeviceGuard;

  static at::MemoryFormat compute_format(const DwGeometry&, at::MemoryFormat suggested,
                                         at::ScalarType) {
    return suggested;
  }

  static void forward(const DwGeometry& g, bool channels_last, const at::Tensor& x,
                      const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
    const DwPlan plan = dw_plan(g, channels_last, {&x, &w, &out});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_fwd", [&] {
      with_spatial_program<DwForwardProgram, scalar_t>(plan, [&](auto program) {
        using P = decltype(program);
        typename P::Args args{x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                              out.mutable_data_ptr<scalar_t>(), g};
        Launcher::template launch<P>(args, P::num_threads(g));
      });
    });
  }

  static void input_grad(const DwGeometry& g, bool channels_last, const at::Tensor& go,
                         const at::Tensor& w, at::Tensor& grad_input) {
    const DwPlan plan = dw_plan(g, channels_last, {&go, &w, &grad_input});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "dw_bwd_in", [&] {
      with_spatial_program<DwInputGradProgram, scalar_t>(plan, [&](auto program) {
        using P = decltype(program);
        typename P::Args args{go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              grad_input.mutable_data_ptr<scalar_t>(), g};
        Launcher::template launch<P>(args, P::num_threads(g));
      });
    });
  }

  static void weight_grad(const DwGeometry& g, bool channels_last, const at::Tensor& go,
                          const at::Tensor& x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
    const DwWeightGradPlan wplan = dw_weight_grad_plan(g);
    const int64_t taps = static_cast<int64_t>(g.kH) * g.kW;
    const DwPlan plan = dw_plan(g, channels_last, {&go, &x});
    const bool with_bias = grad_bias.numel() > 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bwd_w", [&] {
      using Acc = at::opmath_type<scalar_t>;
      at::Tensor partial = at::empty({wplan.chunks, taps + 1, g.C},
                                     x.options().dtype(c10::CppTypeToScalarType<Acc>::value));
      with_weight_grad_program<scalar_t>(plan, [&](auto program) {
        using P = decltype(program);
        typename P::Args args{go.const_data_ptr<scalar_t>(),
                              x.const_data_ptr<scalar_t>(),
                              partial.mutable_data_ptr<Acc>(),
                              g,
                              wplan,
                              with_bias};
        Launcher::template launch<P>(args, P::num_threads(g, wplan));
      });
      dw_reduce_weight_grad<Launcher, scalar_t, Acc>(partial, taps, g.C, grad_weight, grad_bias);
    });
  }
};

// The three op bodies: checks, device guard, layout and allocation, then `Compute` does the
// arithmetic in Compute::compute_format; results come back in the layout PyTorch would give.
template <typename Compute>
at::Tensor depthwise_conv2d_fwd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DwGeometry g =
      dw_geometry(input.sizes(), {weight.size(-2), weight.size(-1)}, stride, padding, dilation);
  dw_check_weight(weight, input, g.C);
  const typename Compute::DeviceGuard guard(input.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.C &&
                    bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                "depsep: bias must be [C] with the input's dtype and device");
  const auto format = input.suggest_memory_format();
  const auto compute = Compute::compute_format(g, format, input.scalar_type());
  at::Tensor output = at::empty({g.N, g.C, g.OH, g.OW}, input.options().memory_format(compute));
  if (output.numel() > 0)
    Compute::forward(g, compute == at::MemoryFormat::ChannelsLast, input.contiguous(compute),
                     dw_tap_major(weight), has_bias ? bias->contiguous() : at::Tensor(), output);
  return output.contiguous(format);
}

template <typename Compute>
at::Tensor depthwise_conv2d_bwd_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                      at::IntArrayRef input_shape, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const DwGeometry g =
      dw_geometry(input_shape, {weight.size(-2), weight.size(-1)}, stride, padding, dilation);
  dw_check_weight(weight, grad_output, g.C);
  const typename Compute::DeviceGuard guard(grad_output.device());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "depsep: grad_output must be [", g.N, ", ", g.C, ", ", g.OH, ", ", g.OW, "], got ",
              grad_output.sizes());
  const auto format = grad_output.suggest_memory_format();
  const auto compute = Compute::compute_format(g, format, grad_output.scalar_type());
  at::Tensor grad_input = at::empty(input_shape, grad_output.options().memory_format(compute));
  if (grad_input.numel() > 0 && grad_output.numel() == 0) grad_input.zero_();
  if (grad_output.numel() > 0)
    Compute::input_grad(g, compute == at::MemoryFormat::ChannelsLast,
                        grad_output.contiguous(compute), dw_tap_major(weight), grad_input);
  return grad_input.contiguous(format);
}

template <typename Compute>
std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_bwd_weight(
    const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool compute_bias) {
  const DwGeometry g = dw_geometry(input.sizes(), kernel_size, stride, padding, dilation);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.C &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "depsep: grad_output must be [", g.N, ", ", g.C, ", ", g.OH, ", ", g.OW, "], got ",
              grad_output.sizes());
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type() && grad_output.device() == input.device(),
      "depsep: grad_output must match the input's dtype and device");
  const typename Compute::DeviceGuard guard(input.device());
  at::Tensor grad_weight = at::empty({g.C, 1, g.kH, g.kW}, input.options());
  at::Tensor grad_bias = at::empty({compute_bias ? g.C : 0}, input.options());
  if (g.C == 0 || grad_output.numel() == 0) return {grad_weight.zero_(), grad_bias.zero_()};

  const auto compute =
      Compute::compute_format(g, input.suggest_memory_format(), input.scalar_type());
  Compute::weight_grad(g, compute == at::MemoryFormat::ChannelsLast,
                       grad_output.contiguous(compute), input.contiguous(compute), grad_weight,
                       grad_bias);
  return {grad_weight, grad_bias};
}

}  // namespace depsep
