// The BatchNorm + activation passes of the native fused ops, on any launcher: the activation
// parser, the per-channel BN vectors, the running-statistics step, the statistics reduction
// (bn_reduce) and BnActPasses (statistics, apply, backward) over a convolution's output y.
// `Launcher` runs the thread programs of bn_act_programs.h on the host or the GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/static_switch.h"
#include "fused/bn_act_programs.h"

namespace depsep {

inline int32_t bn_parse_activation(c10::string_view name) {
  if (name == "relu") return kActRelu;
  if (name == "relu6") return kActRelu6;
  if (name == "silu") return kActSilu;
  if (name == "hardswish") return kActHardswish;
  TORCH_CHECK(name == "none",
              "depsep: activation must be 'relu', 'relu6', 'silu', 'hardswish' or 'none', got '",
              std::string(name), "'");
  return kActNone;
}

inline at::ScalarType bn_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// An optional per-channel BN tensor as a contiguous Acc vector (undefined when absent).
inline at::Tensor bn_channel_vector(const std::optional<at::Tensor>& t, const char* name, int64_t C,
                                    const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "depsep: ", name, " must have shape [", C,
              "], got ", t->sizes());
  TORCH_CHECK(t->device() == like.device(), "depsep: ", name, " must be on ", like.device());
  // Tensor::to dispatches even when it has nothing to do; contiguous() checks inline.
  const at::ScalarType acc = bn_acc_type(like.scalar_type());
  return (t->scalar_type() == acc ? *t : t->to(acc)).contiguous();
}

template <typename Acc>
const Acc* bn_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<Acc>() : nullptr;
}

// y seen as [N, C, S], contiguous in one of the two layouts.
struct BnView {
  int64_t N, C, S;
  bool channels_last;
};

inline BnView bn_view(const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, "depsep: expected a 4-D convolution output");
  const bool cl = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  TORCH_CHECK(cl || y.is_contiguous(), "depsep: internal: convolution output not contiguous");
  return {y.size(0), y.size(1), y.size(2) * y.size(3), cl};
}

// The per-channel vectors of one BN, in two [2, C] Acc tensors (two allocations, no views: a
// tensor op costs the host about a microsecond, which a tiny layer notices): `stats` holds the
// mean and biased variance that the op returns (the batch's in training, a copy of the given
// ones otherwise), `affine` the scale and shift that fold BN into one multiply-add. bn_reduce
// fills both.
struct BnVectors {
  at::Tensor stats, affine;

  BnVectors(int64_t C, const at::Tensor& like) {
    const auto options = like.options().dtype(bn_acc_type(like.scalar_type()));
    stats = at::empty({2, C}, options);
    affine = at::empty({2, C}, options);
  }

  int64_t channels() const { return stats.size(1); }
  at::TensorOptions options() const { return stats.options(); }

  template <typename Acc>
  Acc* mean() const {
    return stats.mutable_data_ptr<Acc>();
  }
  template <typename Acc>
  Acc* var() const {
    return stats.mutable_data_ptr<Acc>() + channels();
  }
  template <typename Acc>
  Acc* scale() const {
    return affine.mutable_data_ptr<Acc>();
  }
  template <typename Acc>
  Acc* shift() const {
    return affine.mutable_data_ptr<Acc>() + channels();
  }

  template <typename Acc>
  BnChannelVectors<Acc> channel_vectors() const {
    return {mean<Acc>(), scale<Acc>(), shift<Acc>()};
  }
};

// The running-statistics step of a training call, on the tensors' device: num_batches_tracked
// (if given) counts the batch, then each channel's running mean and variance move towards the
// batch's (unbiased variance over `count` values) by `momentum`, or by 1 / num_batches_tracked
// when momentum is None.
template <typename Launcher>
void bn_update_running_stats(const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& num_batches_tracked,
                             std::optional<double> momentum, int64_t count) {
  const bool counted = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (counted) num_batches_tracked->add_(1);
  if (!running_mean.has_value() || !running_mean->defined()) return;
  const at::Tensor& rm = *running_mean;
  const at::Tensor& rv = *running_var;
  TORCH_CHECK(rm.is_contiguous() && rv.is_contiguous() && rm.scalar_type() == rv.scalar_type(),
              "depsep: running_mean and running_var must be contiguous and of one dtype");
  TORCH_CHECK(momentum.has_value() || counted,
              "depsep: momentum=None (a cumulative average) needs num_batches_tracked");
  TORCH_CHECK(!counted || num_batches_tracked->scalar_type() == at::kLong,
              "depsep: num_batches_tracked must be an int64 tensor");
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "bn_running_stats", [&] {
    using Acc = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "bn_running", [&] {
      using R = BnRunningStatsProgram<Acc, scalar_t>;
      typename R::Args args{
          stats.const_data_ptr<Acc>(),
          rm.mutable_data_ptr<scalar_t>(),
          rv.mutable_data_ptr<scalar_t>(),
          momentum.has_value() ? nullptr : num_batches_tracked->const_data_ptr<int64_t>(),
          static_cast<Acc>(momentum.value_or(0.0)),
          static_cast<Acc>(count) / static_cast<Acc>(count - 1),
          stats.size(1)};
      Launcher::template launch<R>(args, R::num_threads(args));
    });
  });
}

// Fills v: with `partial` ([chunks, 3, C] moments, in order) the batch's mean and variance,
// merged in groups of kBnMergeGroup chunks while more are left; without it (undefined: eval, a
// backward) a copy of `mean` and `var`, Acc vectors. Then the scale and shift.
template <typename Launcher>
void bn_reduce(BnVectors& v, at::Tensor partial, const at::Tensor& mean, const at::Tensor& var,
               const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  AT_DISPATCH_FLOATING_TYPES(v.stats.scalar_type(), "bn_reduce", [&] {
    using Acc = scalar_t;
    using M = BnMomentsMergeProgram<Acc>;
    while (partial.defined() && partial.size(0) > kBnMergeGroup) {
      at::Tensor merged =
          at::empty({M::groups(partial.size(0)), 3, partial.size(2)}, partial.options());
      typename M::Args args{partial.const_data_ptr<Acc>(), merged.mutable_data_ptr<Acc>(),
                            partial.size(0), partial.size(2)};
      Launcher::template launch<M>(args, M::num_threads(args));
      partial = merged;
    }
    using R = BnStatsReduceProgram<Acc>;
    typename R::Args args{partial.defined() ? partial.const_data_ptr<Acc>() : nullptr,
                          partial.defined() ? nullptr : mean.const_data_ptr<Acc>(),
                          partial.defined() ? nullptr : var.const_data_ptr<Acc>(),
                          bn_ptr_or_null<Acc>(gamma),
                          bn_ptr_or_null<Acc>(beta),
                          v.mean<Acc>(),
                          v.var<Acc>(),
                          v.scale<Acc>(),
                          v.shift<Acc>(),
                          static_cast<Acc>(eps),
                          partial.defined() ? partial.size(0) : 0,
                          v.channels()};
    Launcher::template launch<R>(args, R::num_threads(args));
  });
}

template <typename Launcher>
struct BnActPasses {
  // Leaves act(BN(y)) in y; returns the [2, C] mean and biased variance it normalised with.
  static at::Tensor forward(at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            bool training, double eps, int32_t act) {
    const BnView v = bn_view(y);
    BnVectors bn(v.C, y);
    const int64_t positions = v.N * v.S;
    const int64_t chunk = bn_chunk_positions(positions);
    const int64_t chunks = training ? (positions + chunk - 1) / chunk : 0;
    const at::Tensor partial = training ? at::empty({chunks, 3, v.C}, bn.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd", [&] {
      using Acc = at::opmath_type<scalar_t>;
      bool_switch(v.channels_last, [&](auto cl) {
        constexpr bool CL = decltype(cl)::value;
        if (chunks > 0) {
          using P = BnStatsPartialProgram<scalar_t, Acc, CL>;
          typename P::Args args{y.const_data_ptr<scalar_t>(),
                                partial.mutable_data_ptr<Acc>(),
                                v.N,
                                v.C,
                                v.S,
                                chunk,
                                chunks};
          Launcher::template launch<P>(args, P::num_threads(args));
        }
        bn_reduce<Launcher>(bn, partial, running_mean, running_var, gamma, beta, eps);
        using A = BnApplyProgram<scalar_t, Acc, CL>;
        typename A::Args apply{
            y.mutable_data_ptr<scalar_t>(), bn.channel_vectors<Acc>(), v.N, v.C, v.S, act};
        Launcher::template launch<A>(apply, A::num_threads(apply));
      });
    });
    return bn.stats;
  }

  // Turns y into g_y (the gradient at the convolution output) in place; returns the gradients
  // of gamma and beta in Acc.
  static std::tuple<at::Tensor, at::Tensor> backward(at::Tensor& y, const at::Tensor& grad_out,
                                                     const at::Tensor& gamma,
                                                     const at::Tensor& beta, const at::Tensor& mean,
                                                     const at::Tensor& var, bool training,
                                                     double eps, int32_t act) {
    const BnView v = bn_view(y);
    BnVectors bn(v.C, y);
    bn_reduce<Launcher>(bn, at::Tensor(), mean, var, gamma, beta, eps);
    const auto acc_options = bn.options();
    at::Tensor grad_gamma = at::empty({v.C}, acc_options);
    at::Tensor grad_beta = at::empty({v.C}, acc_options);
    at::Tensor coef = at::empty({3, v.C}, acc_options);
    const int64_t positions = v.N * v.S;
    const int64_t chunk = bn_chunk_positions(positions);
    const int64_t chunks = (positions + chunk - 1) / chunk;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_bwd", [&] {
      using Acc = at::opmath_type<scalar_t>;
      at::Tensor partial = at::empty({chunks, 2, v.C}, acc_options);
      bool_switch(v.channels_last, [&](auto cl) {
        constexpr bool CL = decltype(cl)::value;
        typename BnGradSumsProgram<scalar_t, Acc, CL>::Args args{
            y.mutable_data_ptr<scalar_t>(),
            grad_out.const_data_ptr<scalar_t>(),
            bn.channel_vectors<Acc>(),
            partial.mutable_data_ptr<Acc>(),
            coef.const_data_ptr<Acc>(),
            v.N,
            v.C,
            v.S,
            chunk,
            chunks,
            act,
            training};
        using Sums = BnGradSumsProgram<scalar_t, Acc, CL>;
        Launcher::template launch<Sums>(args, Sums::num_threads(args));
        using G = BnGradReduceProgram<Acc>;
        typename G::Args reduce{partial.const_data_ptr<Acc>(),
                                bn_ptr_or_null<Acc>(gamma),
                                bn.var<Acc>(),
                                grad_gamma.mutable_data_ptr<Acc>(),
                                grad_beta.mutable_data_ptr<Acc>(),
                                coef.mutable_data_ptr<Acc>(),
                                static_cast<Acc>(eps),
                                static_cast<Acc>(positions),
                                chunks,
                                v.C,
                                training};
        Launcher::template launch<G>(reduce, G::num_threads(reduce));
        using Apply = BnGradApplyProgram<scalar_t, Acc, CL>;
        Launcher::template launch<Apply>(args, Apply::num_threads(args));
      });
    });
    return {grad_gamma, grad_beta};
  }
};

}  // namespace depsep
