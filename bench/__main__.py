"""Command line: `python -m bench [--quick] [--ops ...] [--device cpu|cuda] ...`; see --help."""

import argparse
import os
import shlex
import sys
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

import kernels
from bench import depthwise
from bench.harness import REFERENCE, Case, Grid, Op, make_cases, make_timer, measure_copy, run_case
from bench.report import Run, collect_run_info, print_tables, write_outputs

# Every benchmarked op; a new op module adds its OP here.
OPS = {op.name: op for op in (depthwise.OP,)}
LAYOUTS = ("channels_last", "nchw")
DTYPES = ("float32", "float64", "float16", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Microbenchmarks of the depsep kernels against PyTorch on MobileNet V1 layers.",
    )
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument(
        "--backends",
        nargs="+",
        metavar="BACKEND",
        help="backends to run besides the torch reference, which always runs "
        "(default: every depsep backend, and each baseline where it applies)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=DTYPES,
        help="default: float32 on CPU; bfloat16 float32 on CUDA",
    )
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("forward", "backward"),
        default=["forward", "backward"],
        help="backward times the gradient kernels alone (a retained graph), not the forward",
    )
    parser.add_argument("--batch", type=int, help="default: 8 on CPU, 128 on CUDA")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="4 layers per op and shorter timing")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: bench/results/<date>-<device>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def backend_availability(device: torch.device) -> dict[str, str | None]:
    """Depsep backend -> None if it runs on the device, else why not."""
    availability = {
        name: reason
        for name, reason in kernels.available_backends(device).items()
        if name != REFERENCE
    }
    if device.type == "cpu" and "triton" in availability and availability["triton"] is None:
        # Triton on a CPU is its interpreter (TRITON_INTERPRET=1): a test aid, too slow to time.
        availability["triton"] = "Triton on CPU is the interpreter, for tests only"
    return availability


def backends_for(
    op: Op,
    cases: list[Case],
    requested: list[str] | None,
    availability: dict[str, str | None],
    device: torch.device,
) -> list[str]:
    """The reference, then the op's baselines, then the depsep backends.

    By default a baseline that applies to none of the cases (the CUDA-only one on a CPU) is left
    out; every depsep backend is kept, so the tables say why one did not run.
    """
    if requested is not None:
        return [REFERENCE, *(name for name in (*op.baselines, *availability) if name in requested)]
    applicable = [
        name
        for name, unavailable in op.baselines.items()
        if any(unavailable(case, device) is None for case in cases)
    ]
    return [REFERENCE, *applicable, *availability]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))

    ops = [OPS[name] for name in args.ops]
    availability = backend_availability(device)
    known = [REFERENCE, *availability, *(b for op in ops for b in op.baselines)]
    unknown = sorted(set(args.backends or ()) - set(known))
    if unknown:
        choices = ", ".join(dict.fromkeys(known))
        sys.exit(f"--backends: unknown {', '.join(unknown)}; choose from {choices}")

    dtype_names = args.dtypes or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    grid = Grid(
        batch=args.batch or (128 if device.type == "cuda" else 8),
        dtypes=tuple(getattr(torch, name) for name in dtype_names),
        layouts=tuple(args.layouts),
        modes=tuple(args.modes),
        quick=args.quick,
    )
    default_out = Path(__file__).parent / "results" / f"{date.today().isoformat()}-{device.type}"
    out_dir = args.out or default_out

    time_fn = make_timer(device, args.quick)
    copy_bytes, copy_timing = measure_copy(device, time_fn)
    work = []  # (op, case, backends), in table order
    for op in ops:
        cases = make_cases(op, grid)
        backends = backends_for(op, cases, args.backends, availability, device)
        work += [(op, case, backends) for case in cases]
    results = []
    for op, case, backends in tqdm(work, desc="bench", unit="case", disable=args.no_progress):
        results += run_case(op, case, backends, device, availability, time_fn)

    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    run = Run(
        info=collect_run_info(device, command.strip()),
        copy_bytes=copy_bytes,
        copy_timing=copy_timing,
        results=tuple(results),
        baselines={op.name: (REFERENCE, *op.baselines) for op in ops},
    )
    print_tables(run)
    for path in write_outputs(run, out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
