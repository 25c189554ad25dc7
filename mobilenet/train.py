"""Trains MobileNet V1 with the fast layers on synthetic data and measures its throughput against
the reference layers in the same run:

    python -m mobilenet.train --synthetic --alpha 1.0 --batch 32 --resolution 224 --steps 20

Both models start from the same parameters (the fast model loads the reference's state_dict)
and train on the same batch, so the throughput numbers compare like for like and the first
step's losses agree up to rounding. Later losses drift apart as any two implementations' do:
training amplifies rounding differences, the more so the fewer values per channel BatchNorm
sees (at 32x32 input the last blocks normalise batch x 1 x 1 values). One fixed random batch
stands in for a dataset: a loader would otherwise dominate the measurement.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import kernels

from . import reference
from .model import MobileNet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mobilenet.train", description=__doc__)
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="train on one fixed random batch (the only data source so far; required)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="width multiplier")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--resolution", type=int, default=224, help="input image side")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (allocator, autotuning)"
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--backend",
        choices=kernels.BACKENDS,
        default=None,
        help="backend of the fast layers (default: auto for the device)",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="channels_last model and input"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.synthetic:
        parser.error("no dataset loader yet: pass --synthetic")
    for name in ("batch", "resolution", "steps", "num_classes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    name: str,
) -> tuple[list[float], float]:
    """`args.warmup` then `args.steps` SGD steps on one batch; returns every step's loss and the
    images per second of the timed steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model.train()
    losses = []
    start = None
    progress = tqdm(range(args.warmup + args.steps), desc=name, unit="step", file=sys.stderr)
    for step in progress:
        if step == args.warmup:
            _synchronize(images.device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # no .item() here: it would stall the GPU queue every step
    _synchronize(images.device)
    seconds = time.perf_counter() - start
    losses = [loss.item() for loss in losses]
    progress.set_postfix(loss=f"{losses[-1]:.4f}")
    progress.close()
    return losses, args.steps * images.shape[0] / seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    baseline = reference.MobileNet(args.alpha, args.num_classes)
    fast = MobileNet(args.alpha, args.num_classes, backend=args.backend)
    fast.load_state_dict(baseline.state_dict())
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=generator)
    labels = torch.randint(args.num_classes, (args.batch,), generator=generator)
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)

    layout = "channels_last" if args.channels_last else "NCHW"
    print(
        f"MobileNet V1 alpha={args.alpha}, {args.num_classes} classes, batch {args.batch}, "
        f"{args.resolution}x{args.resolution}, {device}, float32, {layout}; fast layers' "
        f"backend: {args.backend or 'auto'}; {args.steps} timed steps after {args.warmup} warm-up"
    )
    results = {}
    for name, model in (("reference", baseline), ("fast", fast)):
        model.to(device, memory_format=memory_format)
        results[name] = train(model, images, labels, args, name)
    for name, (losses, rate) in results.items():
        loss = f"loss {losses[0]:.6f} (first step) -> {losses[-1]:.6f}"
        print(f"{name:>9}: {rate:10.1f} images/s   {loss}")
    speedup = results["fast"][1] / results["reference"][1]
    print(f" speed-up: {speedup:.2f}x (fast over reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
