"""The one measurement harness: case and result records, correctness gate, timing.

Every op module (bench/depthwise.py, ...) describes its cases as an `Op`; `run_case` checks each
backend against the "torch" backend and times only those that agree.
"""

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.benchmark

try:
    from triton.testing import do_bench
except ImportError:
    do_bench = None

REFERENCE = "torch"

# Relative to the reference's largest magnitude: the weight gradient sums N*H*W products, so its
# rounding error grows with its size; an index bug still shows as an O(1) error. float32 leaves
# room for TF32 in cuDNN.
_TOLERANCE = {
    torch.float64: 1e-7,
    torch.float32: 1e-3,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: an op's layer at a batch, dtype, memory layout and mode."""

    op: str
    mode: str
    layer: Any  # the op's frozen layer record (bench.shapes); `layer.name` labels rows
    batch: int
    dtype: torch.dtype
    layout: str
    shape: str  # human-readable, for tables
    min_bytes: int  # each input read once, each output written once


@dataclass(frozen=True)
class Timing:
    """Seconds per call."""

    median: float
    p20: float
    p80: float

    @classmethod
    def from_samples(cls, seconds: Sequence[float]) -> "Timing":
        quantiles = torch.tensor(seconds, dtype=torch.float64).quantile(
            torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
        )
        return cls(*quantiles.tolist())


@dataclass(frozen=True)
class Result:
    case: Case
    backend: str
    status: str  # "ok", "wrong", "unavailable" or "failed"
    timing: Timing | None = None
    detail: str = ""  # why it is not "ok"


Outputs = dict[str, torch.Tensor]
Runner = Callable[[], Outputs]


@dataclass(frozen=True)
class Op:
    """What the harness needs from an op module.

    make_case(layer, batch, dtype, layout, mode) describes one case;
    make_inputs(case, device) builds the tensors every backend of a case shares;
    make_runner(case, inputs, backend) returns the zero-argument callable to check and time;
    baselines maps each extra baseline backend (beside "torch") to a function
    (case, device) -> None if it applies there, else the reason it does not.
    """

    name: str
    modes: tuple[str, ...]
    layers: tuple[Any, ...]
    quick_layers: tuple[Any, ...]
    make_case: Callable[[Any, int, torch.dtype, str, str], Case]
    make_inputs: Callable[[Case, torch.device], Any]
    make_runner: Callable[[Case, Any, str], Runner]
    baselines: Mapping[str, Callable[[Case, torch.device], str | None]]


@dataclass(frozen=True)
class Grid:
    """The case grid the command line asked for, shared by all ops."""

    batch: int
    dtypes: tuple[torch.dtype, ...]
    layouts: tuple[str, ...]
    modes: tuple[str, ...]
    quick: bool


def make_cases(op: Op, grid: Grid) -> list[Case]:
    """Cases ordered so that each table's rows (one per layer) run back to back."""
    layers = op.quick_layers if grid.quick else op.layers
    modes = [mode for mode in grid.modes if mode in op.modes]
    return [
        op.make_case(layer, grid.batch, dtype, layout, mode)
        for mode, dtype, layout, layer in itertools.product(
            modes, grid.dtypes, grid.layouts, layers
        )
    ]


def layout_format(layout: str) -> torch.memory_format:
    return {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[layout]


def make_timer(device: torch.device, quick: bool) -> Callable[[Callable[[], Any]], Timing]:
    """Return the timing function for the device; each call warms up and then samples."""
    if device.type == "cuda":
        warmup_ms, rep_ms = (10, 25) if quick else (25, 100)
        if do_bench is not None:

            def time_cuda(fn):
                # do_bench flushes L2 before every call, so each call reads from DRAM.
                median, p20, p80 = do_bench(
                    fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]
                )
                return Timing(median * 1e-3, p20 * 1e-3, p80 * 1e-3)

            return time_cuda
        return lambda fn: Timing.from_samples(_cuda_event_samples(fn, warmup_ms, rep_ms))

    min_run_time = 0.05 if quick else 0.4

    def time_cpu(fn):
        # Timer defaults to one thread; measure with the threads the run was given.
        timer = torch.utils.benchmark.Timer(
            stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
        )
        return Timing.from_samples(timer.blocked_autorange(min_run_time=min_run_time).times)

    return time_cpu


def _cuda_event_samples(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's protocol with CUDA events, for machines without Triton: seconds per call."""
    l2_flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(max(1, int(rep_ms / estimate_ms)))
    ]
    for call_start, call_end in events:
        l2_flush.zero_()
        call_start.record()
        fn()
        call_end.record()
    torch.cuda.synchronize()
    return [call_start.elapsed_time(call_end) * 1e-3 for call_start, call_end in events]


def measure_copy(
    device: torch.device, time_fn: Callable[[Callable[[], Any]], Timing]
) -> tuple[int, Timing]:
    """Time a large tensor copy_, the practical bandwidth ceiling: (bytes moved, timing)."""
    # Far beyond the last-level cache: 1 GiB on a GPU, 64 MiB on a CPU.
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)
    source = torch.ones(numel, device=device)
    destination = torch.empty_like(source)
    timing = time_fn(lambda: destination.copy_(source))
    return 2 * source.nbytes, timing


def check_close(actual: Outputs, expected: Outputs, dtype: torch.dtype) -> str | None:
    """None when every output matches the reference, else one line about the first mismatch."""
    tolerance = _TOLERANCE[dtype]
    for name, reference in expected.items():
        atol = tolerance * max(reference.abs().max().item(), 1.0)
        try:
            torch.testing.assert_close(actual[name], reference, rtol=tolerance, atol=atol)
        except AssertionError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            wanted = [
                line for line in lines if line.startswith(("Mismatched", "Greatest absolute"))
            ]
            return f"{name}: " + re.sub(r" at index \(.*?\)", "", "; ".join(wanted or lines[:1]))
    return None


def run_case(
    op: Op,
    case: Case,
    backends: Sequence[str],
    device: torch.device,
    availability: Mapping[str, str | None],
    time_fn: Callable[[Callable[[], Any]], Timing],
) -> list[Result]:
    """Check every backend against the reference, then time those that agree.

    `availability` maps depsep backends to the reason they cannot run on this device (None: can).
    """
    try:
        inputs = op.make_inputs(case, device)
        reference_runner = op.make_runner(case, inputs, REFERENCE)
        expected = reference_runner()
        results = [Result(case, REFERENCE, "ok", time_fn(reference_runner))]
    except Exception as error:  # e.g. out of memory: report it and go on with the next case
        reference_failed = "the torch reference failed on this case"
        return [Result(case, REFERENCE, "failed", detail=_describe(error))] + [
            Result(case, backend, "unavailable", detail=reference_failed)
            for backend in backends
            if backend != REFERENCE
        ]
    del reference_runner  # frees the reference's autograd graph before the next backend builds one
    for backend in backends:
        if backend == REFERENCE:
            continue
        reason = (
            op.baselines[backend](case, device)
            if backend in op.baselines
            else availability[backend]
        )
        if reason is not None:
            results.append(Result(case, backend, "unavailable", detail=reason))
            continue
        results.append(_check_and_time(op, case, inputs, backend, expected, time_fn))
    return results


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _check_and_time(op, case, inputs, backend, expected, time_fn) -> Result:
    try:
        runner = op.make_runner(case, inputs, backend)
        mismatch = check_close(runner(), expected, case.dtype)
        if mismatch is not None:
            return Result(case, backend, "wrong", detail=mismatch)
        return Result(case, backend, "ok", time_fn(runner))
    except Exception as error:  # a crashing backend is a result to report, not a reason to stop
        return Result(case, backend, "failed", detail=_describe(error))
