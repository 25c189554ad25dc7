"""Command line: `python -m bench [--quick] [--ops ...] [--device cpu|cuda] ...`; see --help."""

import argparse
import dataclasses
import os
import shlex
import sys
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from bench import block, bn_act, depthwise, model, overhead
from bench.harness import (
    COMPILE_MODES,
    REFERENCE,
    Case,
    Deadline,
    Op,
    backend_availability,
    make_cases,
    make_host_timer,
    make_timer,
    measure_copy,
    run_case,
)
from bench.report import (
    CSV_NAME,
    SUMMARY_NAME,
    Run,
    collect_run_info,
    print_tables,
    write_csv,
    write_markdown,
)

# Every benchmarked op, in table order; a new op module adds its OP here.
OPS = {
    op.name: op
    for op in (
        depthwise.OP,
        bn_act.DEPTHWISE_OP,
        bn_act.POINTWISE_OP,
        block.OP,
        model.OP,
        overhead.OP,
    )
}
MODES = ("forward", "backward", "forward+backward", "eval")
LAYOUTS = ("channels_last", "nchw")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One op's default suite on one device type: what runs unless the command line says."""

    modes: tuple[str, ...]
    layers: str  # the layer set measured: "all" or "subset" (Op.layer_set)
    layouts: tuple[str, ...]
    compile_layers: str | None = None  # the layer set torch.compile runs on; None: none
    max_autotune: bool = False  # whether mode="max-autotune" runs there too


# The benchmark protocol (every MobileNet V1 layer at batch 128 on a GPU, against eager,
# PyTorch's native depthwise kernel and torch.compile) cut to fit its time budgets: `make bench`
# about two minutes on a 2-core CPU; `make gpu-check`, build and GPU tests included, under 8
# minutes on an H200 (its --time-limit cuts whatever is left, compile baselines last). The modes
# are those the performance targets are set for, in bfloat16 on CUDA and float32 on CPU. A cold
# torch.compile costs seconds per case, and minutes for the whole model on a CPU (140 s for its
# training step on 2 cores); a max-autotune one about as much on a CPU (a few seconds per
# layer), but presumably tens of seconds per layer on a GPU, where it benchmarks Triton GEMM
# configurations (not yet measured here). So on CPU both compile modes run on the last layer
# ("quick") of each fused op and block, not on the model; on CUDA torch.compile runs on the
# 4-layer subset for pointwise_bn_act (whose torch.compile target names it), on the last layer
# of the other layer ops and on the model, and max-autotune on the model alone. A baseline left
# out says so in the tables; --backends names it to run it everywhere it applies.
_TARGET_MODES = ("eval", "forward+backward")
_CL = ("channels_last",)
DEFAULT_PLANS = {
    "cpu": {
        "depthwise": Plan(("forward", "backward"), "all", _CL),
        "depthwise_bn_act": Plan(_TARGET_MODES, "subset", _CL, "quick", max_autotune=True),
        "pointwise_bn_act": Plan(_TARGET_MODES, "subset", _CL, "quick", max_autotune=True),
        "block": Plan(_TARGET_MODES, "subset", _CL, "quick", max_autotune=True),
        "model": Plan(_TARGET_MODES, "all", _CL),
        "overhead": Plan(overhead.MODES, "all", _CL),
    },
    "cuda": {
        "depthwise": Plan(("forward", "backward"), "all", LAYOUTS),
        "depthwise_bn_act": Plan(_TARGET_MODES, "all", _CL, compile_layers="quick"),
        "pointwise_bn_act": Plan(_TARGET_MODES, "all", _CL, compile_layers="subset"),
        "block": Plan(_TARGET_MODES, "all", _CL, compile_layers="quick"),
        "model": Plan(_TARGET_MODES, "all", _CL, compile_layers="all", max_autotune=True),
        "overhead": Plan(overhead.MODES, "all", _CL),
    },
}
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("bfloat16",)}
QUICK_BATCH = 2


def write_outputs(run: Run, out_dir: Path) -> list[Path]:
    """Write the run's files into out_dir: the CSV, the Markdown summary and one PNG per op
    (time per layer per backend beside the fraction of copy bandwidth; for the model, images/s
    beside the training step's memory): at most 7 files."""
    from bench.plots import write_plots  # matplotlib only when files are written

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, summary_path = out_dir / CSV_NAME, out_dir / SUMMARY_NAME
    write_csv(run, csv_path)
    write_markdown(run, summary_path)
    return [csv_path, summary_path, *write_plots(run, out_dir)]


def _op_names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown op {', '.join(unknown) or repr(text)}; choose from {', '.join(OPS)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the depsep kernels against PyTorch eager and torch.compile on "
        "MobileNet V1: its layers, its DepSepConv blocks and the whole model (or, with --model, "
        "other networks converted by mobilenet.convert). Without options: the default suite of "
        "the device (see bench/__main__.py DEFAULT_PLANS).",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        type=_op_names,
        default=[list(OPS)],
        metavar="OP",
        help=f"ops to run, space- or comma-separated: {', '.join(OPS)} (default: all)",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        metavar="BACKEND",
        help="backends to run besides the torch reference, which always runs "
        "(default: every depsep backend, and each baseline where the default suite has it)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, help="default: float32 on CPU; bfloat16 on CUDA"
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=LAYOUTS,
        help="default: channels_last (on CUDA also nchw for depthwise); --quick: both",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        help="eval: inference forward; forward: training forward; backward: the gradient "
        "kernels alone (a retained graph); forward+backward: both (for the model, a training "
        "step with its SGD step). Default: eval and forward+backward (depthwise: forward and "
        "backward); --quick: all",
    )
    parser.add_argument(
        "--layers",
        choices=("all", "subset"),
        help="MobileNet V1's 13 layers (blocks), or a subset of 4 (default: all on CUDA; on CPU "
        "all depthwise layers and the subset for the fused ops and blocks)",
    )
    parser.add_argument("--batch", type=int, help="default: 128 on CUDA; 8 on CPU (model: 2)")
    parser.add_argument(
        "--model",
        nargs="+",
        metavar="NAME",
        help="the networks of --ops model: mobilenet_v1 (the default), timm:<model> or "
        "torchvision:<model> (random weights; converted by mobilenet.convert)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        help="input image side of --ops model (default: 224; --quick: 64)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every op and mode: one layer (the model at 64x64), batch 2, both "
        "layouts, one CPU thread, 3 timed calls, no torch.compile unless --backends names it",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start no measurement after this long; the rest is reported as skipped",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: bench/results/<date>-<device>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.ops = list(dict.fromkeys(name for names in args.ops for name in names))
    return args


def with_plan(op: Op, plan: Plan, device: torch.device, quick: bool) -> Op:
    """The op with its compile baselines limited as the default suite limits them: each one
    left out of a case is "unavailable" there, with the reason in the tables."""
    ask = "; --backends {} runs it wherever it applies"

    def plan_reason(backend: str, case: Case) -> str | None:
        if quick:
            return "not in --quick (a cold compile takes seconds per case)" + ask.format(backend)
        if plan.compile_layers is None:
            # Measured on a 2-core CPU: 140 s for the model's training step, cold.
            why = "its cold compile takes minutes here"
            return f"not in the default {device.type} run: {why}" + ask.format(backend)
        if backend == "max-autotune" and not plan.max_autotune:
            why = "a max-autotune compile per layer would take tens of seconds"
            return f"not in the default {device.type} run: {why}" + ask.format(backend)
        if case.layer not in op.layer_set(plan.compile_layers):
            names = ", ".join(layer.name for layer in op.layer_set(plan.compile_layers))
            return f"compiled only for {names} in the default run" + ask.format(backend)
        return None

    def limited(backend, applies):
        return lambda case, device: applies(case, device) or plan_reason(backend, case)

    baselines = {
        name: limited(name, applies) if name in COMPILE_MODES else applies
        for name, applies in op.baselines.items()
    }
    return dataclasses.replace(op, baselines=baselines)


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


def _tier(backend: str) -> int:
    """Run order: the eager backends first, then the compile baselines, max-autotune last, so
    that a time limit cuts the slowest compiles first."""
    return list(COMPILE_MODES).index(backend) + 1 if backend in COMPILE_MODES else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1 if args.quick else len(os.sched_getaffinity(0)))
    try:
        _run(args, device, argv)
    finally:
        # The caller's thread count (tests call main in-process).
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> None:
    availability = backend_availability(device)
    known = [REFERENCE, *availability, *(b for op in OPS.values() for b in op.baselines)]
    unknown = sorted(set(args.backends or ()) - set(known))
    if unknown:
        choices = ", ".join(dict.fromkeys(known))
        sys.exit(f"--backends: unknown {', '.join(unknown)}; choose from {choices}")

    dtypes = tuple(getattr(torch, name) for name in args.dtypes or DEFAULT_DTYPES[device.type])
    work = []  # (op, case, backends), cases in table order
    for name in args.ops:
        op, plan = OPS[name], DEFAULT_PLANS[device.type][name]
        if op is model.OP:
            try:
                op = model.with_models(op, args.model, args.resolution, args.quick)
            except ValueError as error:
                sys.exit(str(error))
        layers = "quick" if args.quick else args.layers or plan.layers
        modes = args.modes or (op.modes if args.quick else plan.modes)
        layouts = args.layouts or (LAYOUTS if args.quick else plan.layouts)
        batch = args.batch or (QUICK_BATCH if args.quick else op.default_batch[device.type])
        cases = make_cases(op, op.layer_set(layers), batch, dtypes, layouts, modes)
        backends = backends_for(op, cases, args.backends, availability, device)
        if args.backends is None:
            op = with_plan(op, plan, device, args.quick)
        work += [(op, case, backends) for case in cases]

    device_time_fn = make_timer(device, args.quick)
    host_time_fn = make_host_timer(device, args.quick)
    deadline = Deadline(args.time_limit)
    copy_bytes, copy_timing = measure_copy(device, device_time_fn)
    passes = [
        (op, case, [b for b in backends if _tier(b) == tier])
        for tier in sorted({_tier(b) for _, _, backends in work for b in backends})
        for op, case, backends in work
    ]
    results = []
    for op, case, backends in tqdm(passes, desc="bench", unit="case", disable=args.no_progress):
        if backends:
            time_fn = host_time_fn if op.host_timed else device_time_fn
            results += run_case(op, case, backends, device, availability, time_fn, deadline)
    order = {(case, b): (i, j) for i, (_, case, bs) in enumerate(work) for j, b in enumerate(bs)}
    results.sort(key=lambda result: order[result.case, result.backend])

    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    run = Run(
        info=collect_run_info(device, command.strip()),
        copy_bytes=copy_bytes,
        copy_timing=copy_timing,
        results=tuple(results),
        baselines={op.name: (REFERENCE, *op.baselines) for op in OPS.values()},
        whole_ops=frozenset(op.name for op in OPS.values() if op.whole_network),
    )
    print_tables(run)
    default_out = Path(__file__).parent / "results" / f"{date.today().isoformat()}-{device.type}"
    for path in write_outputs(run, args.out or default_out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
