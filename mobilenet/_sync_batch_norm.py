"""Training-mode BatchNorm with statistics over the batches of every process of a group: what
nn.SyncBatchNorm computes, on CPU (gloo) as well as on GPU.

torch's own implementation (torch.nn.modules._functions.SyncBatchNorm) rests on ATen ops that
exist for CUDA only (batch_norm_stats, batch_norm_gather_stats_with_counts, ...), so the fused
layers use this one, written with ordinary tensor ops, on every device. Same algorithm: each
process gathers every process's per-channel (mean, biased variance, count) and combines them
(Chan et al.'s parallel variance, which stays accurate where sum-of-squares would cancel);
backward all-reduces the two per-channel sums the input gradient needs. Gradients of weight and
bias stay per-process: DistributedDataParallel averages them like any parameter's.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from kernels._common import stats_dtype
from kernels.reference import momentum_factor


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, factor, group):
        # Float32 statistics for float16/bfloat16 input, as the fused ops and cuDNN keep them.
        x = input.to(stats_dtype(input.dtype))
        channels = input.shape[1]
        count = input.numel() // channels
        if count > 0:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        else:  # an empty batch still joins the collective, with a weight of zero
            mean = var = x.new_zeros(channels)
        local = torch.cat([mean, var, x.new_full((1,), count)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group)
        means, variances, counts = torch.stack(gathered).split([channels, channels, 1], dim=1)
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                unbiased = var * (total / (total - 1))
                running_var.lerp_(unbiased.to(running_var.dtype), factor)

        out = (x - _per_channel(mean)) * _per_channel(invstd)
        if weight is not None:
            out = out * _per_channel(weight) + _per_channel(bias)
        ctx.save_for_backward(input, weight, mean, invstd, total)
        ctx.group = group
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd, total = ctx.saved_tensors
        x_hat = (input.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd)
        dy = grad_output.to(mean.dtype)
        sum_dy = dy.sum((0, 2, 3))
        sum_dy_x_hat = (dy * x_hat).sum((0, 2, 3))
        # An affine BatchNorm has both weight and bias, of one dtype; a plain one neither.
        grad_weight = sum_dy_x_hat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_x_hat])
            dist.all_reduce(sums, dist.ReduceOp.SUM, ctx.group)
            sum_dy, sum_dy_x_hat = sums.chunk(2)
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_input = (
                dy - _per_channel(sum_dy / total) - x_hat * _per_channel(sum_dy_x_hat / total)
            ) * _per_channel(scale)
            grad_input = grad_input.to(input.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    *,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    process_group,
) -> Tensor:
    """F.batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training=True,
    momentum, eps) with the batch statistics taken over the inputs of every process in
    `process_group` (all of them must call it), and the running statistics updated with them
    (unbiased over the global count). num_batches_tracked and momentum=None as in the fused ops."""
    factor = momentum_factor(momentum, num_batches_tracked)
    return _SyncBatchNorm.apply(
        input, bn_weight, bn_bias, running_mean, running_var, eps, factor, process_group
    )
