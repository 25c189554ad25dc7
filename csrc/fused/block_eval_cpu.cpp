// CPU kernel of depsep::depthwise_pointwise_eval: the depthwise-separable block in eval as one
// pass over tiles of output rows. Each task computes a tile of the depthwise output (then BN and
// the activation, as the fused depthwise op applies them) into a buffer that stays in cache, and
// the tile's 1x1 product (the BLAS GEMM of cpu_gemm.h, then BN and the activation likewise)
// straight into the block output. Memory traffic: one read of the input (and of each tile's halo
// rows), one write of the output; the depthwise output never goes to memory, where the separate ops
// write it and read it back. Where the tiles would not pay (a small depthwise output beside the 1x1
// weight, or a 1x1 that oneDNN computes faster than the BLAS GEMM) the block runs as the two fused
// ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/activation.h"
#include "common/cpu_isa.h"
#include "common/cpu_launcher.h"
#include "depthwise/depthwise_cpu.h"
#include "fused/bn_act_ops.h"
#include "fused/bn_cpu_launcher.h"
#include "fused/bn_cpu_loops_entry.h"
#include "fused/bn_passes.h"
#include "fused/cpu_gemm.h"

namespace depsep {
namespace {

// A tile holds at least kTilePixels depthwise output pixels, and more while it stays within
// kTileBytes: each tile reads the whole 1x1 weight (4 MiB for 1024 x 1024 channels), so a GEMM
// of fewer rows would be bound by that read. From the shape only: the thread count never
// changes the tiling, nor the result.
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kTilePixels = 256;

// BN in eval as the per-channel scale and shift of a convolution's output, as the separate
// fused ops compute them (bn_reduce), in the accumulation type.
BnVectors eval_scale_shift(int64_t C, const at::Tensor& like,
                           const std::optional<at::Tensor>& bn_weight,
                           const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double eps, const char* const names[4]) {
  const at::Tensor rm = bn_channel_vector(running_mean, names[0], C, like);
  const at::Tensor rv = bn_channel_vector(running_var, names[1], C, like);
  TORCH_CHECK(rm.defined() && rv.defined(), "depsep: ", names[0], " and ", names[1],
              " are required");
  BnVectors bn(C, like);
  bn_reduce<CpuLauncher>(bn, at::Tensor(), rm, rv, bn_channel_vector(bn_weight, names[2], C, like),
                         bn_channel_vector(bn_bias, names[3], C, like), eps);
  return bn;
}

// The depthwise weight [C, 1, kH, kW] tap-major, [kH*kW][C], as the CPU loops read it. A plain
// loop: the ATen ops that would do it cost the host more than these few values.
template <typename T>
at::Tensor tap_major(const at::Tensor& dw_weight) {
  const int64_t C = dw_weight.size(0), taps = dw_weight.size(2) * dw_weight.size(3);
  const at::Tensor w = dw_weight.contiguous();
  at::Tensor out = at::empty({taps, C}, w.options());
  const T* src = w.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < taps; ++t) dst[t * C + c] = src[c * taps + t];
  return out;
}

// act(scale * y + shift) in place over `pixels` rows of `channels` values, in the calling task:
// the BN CPU loops' apply pass, as the fused ops run it.
template <typename T>
void bn_act_rows(T* data, int64_t pixels, const T* scale, const T* shift, int64_t channels,
                 int32_t act) {
  BnCpuPass<T> p = bn_cpu::pass_of<T, true>(1, channels, pixels, pixels, data);
  p.scale = scale;
  p.shift = shift;
  p.act = act;
  if (cpu_loops_use_avx2())
    cpu_avx2::bn_apply(p, 0, 1);
  else
    cpu_base::bn_apply(p, 0, 1);
}

// The tiles pay where the depthwise output is large beside the 1x1 weight that every tile reads
// again (measured on the MobileNet V1 blocks at batch 8: 1.01-1.42x over the two fused ops where
// the output holds 25-1600x the weight's bytes, 0.77-0.95x at 0.4-3x), and where oneDNN's 1x1
// convolution does not beat the tiles' BLAS GEMMs (cpu_gemm.h onednn_pays); elsewhere the block
// runs as the two fused ops (the same code, so the same results).
constexpr int64_t kTiledMinRatio = 16;

bool tiles_pay(const DwGeometry& g, int64_t C_out, at::ScalarType type) {
  // Output pixels x C values against the weight's C_out x C.
  const int64_t pixels = g.N * g.OH * g.OW;
  return pixels >= kTiledMinRatio * C_out && !onednn_pays(type, pixels, g.C, C_out);
}

template <typename T>
struct BlockPass {
  const DwGeometry& g;
  const T* x;
  const T* taps;  // [kH*kW][C]
  const T* dw_scale;
  const T* dw_shift;
  int32_t dw_act;
  const T* pw_weight;  // [C_out, C] row-major
  int64_t C_out;
  const T* pw_scale;
  const T* pw_shift;
  int32_t pw_act;
  T* out;
  at::TensorOptions options;

  int64_t row() const { return g.OW * g.C; }  // depthwise output values per output row

  // Output rows [first, first + count): the depthwise rows into `dw_rows`, then the 1x1 GEMM
  // of those pixels into the output.
  void rows(int64_t first, int64_t count, T* dw_rows, void* scratch) const {
    depthwise(first, count, dw_rows, scratch);
    pointwise(first, count, dw_rows);
  }

  void depthwise(int64_t first, int64_t count, T* dw_rows, void* scratch) const {
    forward_rows_loops<T>(g, x, taps, nullptr, dw_rows, first, first + count, scratch);
    bn_act_rows<T>(dw_rows, count * g.OW, dw_scale, dw_shift, g.C, dw_act);
  }

  void pointwise(int64_t first, int64_t count, T* dw_rows) const {
    const int64_t pixels = count * g.OW;
    T* y = out + first * g.OW * C_out;
    rows_times_weight<T>(dw_rows, pw_weight, y, pixels, g.C, C_out, options);
    bn_act_rows<T>(y, pixels, pw_scale, pw_shift, C_out, pw_act);
  }
};

template <typename T>
void block_pass(const DwGeometry& g, const at::Tensor& input, const at::Tensor& dw_weight,
                const BnVectors& dw_bn, int32_t dw_act, const at::Tensor& pw_weight,
                const BnVectors& pw_bn, int32_t pw_act, const at::Tensor& output) {
  const at::Tensor taps = tap_major<T>(dw_weight), pw = pw_weight.contiguous();
  const int64_t rows = g.N * g.OH;
  const BlockPass<T> pass{g,
                          input.const_data_ptr<T>(),
                          taps.const_data_ptr<T>(),
                          dw_bn.scale<T>(),
                          dw_bn.shift<T>(),
                          dw_act,
                          pw.const_data_ptr<T>(),
                          pw.size(0),
                          pw_bn.scale<T>(),
                          pw_bn.shift<T>(),
                          pw_act,
                          output.mutable_data_ptr<T>(),
                          input.options().memory_format(at::MemoryFormat::Contiguous)};
  const int64_t tile_pixels = std::max<int64_t>(kTilePixels, kTileBytes / (g.C * sizeof(T)));
  const int64_t rows_per_tile = std::max<int64_t>(1, tile_pixels / g.OW);
  const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;
  cpu_parallel(tiles, g, [&](int64_t begin, int64_t end, void* scratch) {
    std::vector<T> buffer(rows_per_tile * pass.row());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * rows_per_tile;
      pass.rows(first, std::min(rows_per_tile, rows - first), buffer.data(), scratch);
    }
  });
}

at::Tensor depthwise_pointwise_eval_cpu(
    const at::Tensor& input, const at::Tensor& dw_weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& dw_bn_weight, const std::optional<at::Tensor>& dw_bn_bias,
    const at::Tensor& dw_running_mean, const at::Tensor& dw_running_var, double dw_eps,
    c10::string_view dw_activation, const at::Tensor& pw_weight,
    const std::optional<at::Tensor>& pw_bn_weight, const std::optional<at::Tensor>& pw_bn_bias,
    const at::Tensor& pw_running_mean, const at::Tensor& pw_running_var, double pw_eps,
    c10::string_view pw_activation) {
  const int32_t dw_act = bn_parse_activation(dw_activation);
  const int32_t pw_act = bn_parse_activation(pw_activation);
  const DwGeometry g = dw_geometry(input.sizes(), {dw_weight.size(-2), dw_weight.size(-1)}, stride,
                                   padding, dilation);
  dw_check_weight(dw_weight, input, g.C);
  TORCH_CHECK(pw_weight.dim() == 4 && pw_weight.size(1) == g.C && pw_weight.size(2) == 1 &&
                  pw_weight.size(3) == 1,
              "depsep: pw_weight must be [C_out, ", g.C, ", 1, 1], got ", pw_weight.sizes());
  TORCH_CHECK(
      pw_weight.scalar_type() == input.scalar_type() && pw_weight.device() == input.device(),
      "depsep: pw_weight must match the input's dtype and device");
  const auto format = input.suggest_memory_format();
  if (!CpuLoopsCompute::has_loops(input.scalar_type()))
    // float16/bfloat16: computed in float32, rounded once at the end.
    return depthwise_pointwise_eval_cpu(input.to(at::kFloat), dw_weight.to(at::kFloat), stride,
                                        padding, dilation, dw_bn_weight, dw_bn_bias,
                                        dw_running_mean, dw_running_var, dw_eps, dw_activation,
                                        pw_weight.to(at::kFloat), pw_bn_weight, pw_bn_bias,
                                        pw_running_mean, pw_running_var, pw_eps, pw_activation)
        .to(input.scalar_type())
        .contiguous(format);
  const int64_t C_out = pw_weight.size(0);
  static const char* const dw_names[4] = {"dw_running_mean", "dw_running_var", "dw_bn_weight",
                                          "dw_bn_bias"};
  static const char* const pw_names[4] = {"pw_running_mean", "pw_running_var", "pw_bn_weight",
                                          "pw_bn_bias"};
  const BnVectors dw_bn = eval_scale_shift(g.C, input, dw_bn_weight, dw_bn_bias, dw_running_mean,
                                           dw_running_var, dw_eps, dw_names);
  const BnVectors pw_bn = eval_scale_shift(C_out, input, pw_bn_weight, pw_bn_bias, pw_running_mean,
                                           pw_running_var, pw_eps, pw_names);
  if (g.N * g.OH * g.OW == 0)
    return at::empty({g.N, C_out, g.OH, g.OW}, input.options().memory_format(format));
  if (!tiles_pay(g, C_out, input.scalar_type())) {
    using Launcher = BnCpuLauncher;
    const at::Tensor dw_out =
        std::get<0>(depthwise_bn_act_fwd<Launcher, DepthwiseConv<CpuLoopsCompute>>(
            input, dw_weight, stride, padding, dilation, dw_bn_weight, dw_bn_bias, dw_running_mean,
            dw_running_var, std::nullopt, false, std::nullopt, dw_eps, dw_activation));
    return std::get<0>(pointwise_bn_act_fwd<Launcher, PointwiseCpuConv>(
        dw_out, pw_weight, pw_bn_weight, pw_bn_bias, pw_running_mean, pw_running_var, std::nullopt,
        false, std::nullopt, pw_eps, pw_activation));
  }
  at::Tensor output = at::empty({g.N, C_out, g.OH, g.OW},
                                input.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_pointwise_eval_cpu", [&] {
    block_pass<scalar_t>(g, input.contiguous(at::MemoryFormat::ChannelsLast), dw_weight, dw_bn,
                         dw_act, pw_weight, pw_bn, pw_act, output);
  });
  return output.contiguous(format);
}

}  // namespace
}  // namespace depsep

TORCH_LIBRARY_IMPL(depsep, CPU, m) {
  m.impl("depthwise_pointwise_eval", &depsep::depthwise_pointwise_eval_cpu);
}
