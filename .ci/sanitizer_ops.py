"""One forward and backward of each native CUDA op on small tensors, for compute-sanitizer
(.ci/gpu_check.py runs it under memcheck, and with --gemm the 1x1 GEMM alone under racecheck).
Shapes leave partial tiles and vectors: odd channel counts, a spatial size off every tile."""

import argparse

import torch

import kernels


def depthwise(dtype):
    x = torch.randn(2, 24, 9, 11, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(24, 1, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(24, device="cuda", dtype=dtype, requires_grad=True)
    kernels.depthwise_conv2d(x, w, b, stride=2, padding=1, backend="native").sum().backward()
    x2 = torch.randn(2, 5, 7, 6, device="cuda", dtype=dtype, requires_grad=True)
    w2 = torch.randn(5, 1, 5, 3, device="cuda", dtype=dtype, requires_grad=True)
    kernels.depthwise_conv2d(x2, w2, padding=(2, 1), backend="native").sum().backward()


def fused(conv, dtype, layout):
    c_in, c_out = (24, 24) if conv == "depthwise" else (40, 72)
    x = torch.randn(2, c_in, 9, 11, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    shape = (c_in, 1, 3, 3) if conv == "depthwise" else (c_out, c_in, 1, 1)
    w = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    bn_w = torch.rand(c_out, device="cuda", requires_grad=True)
    bn_b = torch.randn(c_out, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c_out, device="cuda"), torch.ones(c_out, device="cuda")
    fn = kernels.depthwise_bn_act if conv == "depthwise" else kernels.pointwise_bn_act
    extra = {"padding": 1} if conv == "depthwise" else {}
    for training in (True, False):
        out = fn(x, w, rm, rv, bn_w, bn_b, training=training, backend="native", **extra)
        out.float().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gemm", action="store_true", help="the 1x1 GEMM block programs only")
    args = parser.parse_args()
    if args.gemm:
        fused("pointwise", torch.float16, "channels_last")
    else:
        for dtype in (torch.float32, torch.float16):
            depthwise(dtype)
            for conv in ("depthwise", "pointwise"):
                for layout in ("channels_last", "nchw"):
                    fused(conv, dtype, layout)
    torch.cuda.synchronize()
    print("sanitizer_ops: done")


if __name__ == "__main__":
    main()
