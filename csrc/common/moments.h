// Per-channel moments that merge exactly: the statistics of the fused ops' BatchNorm, computed
// in chunks by the thread programs and merged in a fixed order.
#pragma once

#include "common/host_device.h"

namespace depsep {

// Count, mean and sum of squared deviations of a set of values; two sets merge exactly
// (Chan et al.), which is what makes chunked statistics both stable and order-fixed.
template <typename Acc>
struct BnMoments {
  Acc count, mean, m2;
};

template <typename Acc>
DEPSEP_HD BnMoments<Acc> bn_merge(const BnMoments<Acc>& a, const BnMoments<Acc>& b) {
  const Acc count = a.count + b.count;
  if (count == Acc(0)) return a;
  const Acc delta = b.mean - a.mean;
  const Acc wb = b.count / count;
  return {count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// Moments from sums of values shifted by one of them: s1 = sum(y - shift), s2 = sum((y -
// shift)^2). The shift keeps s2 - s1^2/n free of cancellation when the mean is large.
template <typename Acc>
DEPSEP_HD BnMoments<Acc> bn_moments_from_shifted_sums(Acc count, Acc shift, Acc s1, Acc s2) {
  if (count == Acc(0)) return {Acc(0), Acc(0), Acc(0)};
  const Acc d = s1 / count;
  const Acc m2 = s2 - s1 * d;
  return {count, shift + d, m2 > Acc(0) ? m2 : Acc(0)};
}

}  // namespace depsep
