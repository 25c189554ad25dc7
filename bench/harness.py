"""The one measurement harness: case and result records, correctness gate, timing, memory.

Every op module (bench/depthwise.py, ...) describes its cases as an `Op`; `run_case` checks each
backend against the "torch" reference and times only those that agree. The torch.compile
baselines of every op are built here too (`compile_reference`), so all ops compile alike.
"""

import copy
import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.benchmark

import kernels

try:
    from triton.testing import do_bench
except ImportError:
    do_bench = None

REFERENCE = "torch"
# torch.compile of the reference, by compile mode; compile time is never timed.
COMPILE_MODES = {"compile": "default", "max-autotune": "max-autotune"}
# An op's `baselines` entry for them: torch.compile applies wherever the reference runs.
COMPILE_BASELINES = {name: (lambda case, device: None) for name in COMPILE_MODES}

# (outputs, gradients), relative to the reference's largest magnitude: a weight gradient sums
# N*H*W products, so its rounding error grows with its size; an index bug still shows as an
# O(1) error. float32 is checked against PyTorch's float32 result (run_case), whose BatchNorm
# gradients are off by up to 0.3% of their largest value (measured against float64 on the
# MobileNet layers); its outputs leave room for TF32 in cuDNN.
_TOLERANCE = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-3, 1e-2),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# The fraction of an output's elements that may always miss the tolerance (check_close): a few
# ReLUs of values near zero flip between two correct kernels.
_ALLOWED_MISSES = {
    torch.float64: 1e-4,
    torch.float32: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# Timings take at least this many samples, so that slow calls (a model's training step) still
# get a median and a spread.
_MIN_SAMPLES = 5


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
    # The least traffic the mode can cost (the op module documents its formula); None where
    # bandwidth says nothing (the whole model).
    min_bytes: int | None
    images: int = 0  # images one call processes, for images/s (the model); 0: not reported


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
    status: str  # "ok", "wrong", "failed", "unavailable" or "skipped" (time limit)
    timing: Timing | None = None
    # Why it is not "ok"; for an "ok" result, a remark (which kernel PyTorch picked).
    detail: str = ""
    memory: Mapping[str, int] = field(default_factory=dict)  # metric -> bytes (see measure_memory)


Outputs = dict[str, torch.Tensor]  # what a runner returns, by name; gradients named "grad_*"
Runner = Callable[[], Outputs]


@dataclass(frozen=True)
class Op:
    """What the harness needs from an op module.

    make_case(layer, batch, dtype, layout, mode) describes one case;
    make_inputs(case, device) builds the tensors every backend of a case shares;
    make_runner(case, inputs, backend) returns the zero-argument callable to check and time
    (building it may compile: that is never timed);
    baselines maps each extra baseline backend (beside "torch") to a function
    (case, device) -> None if it applies there, else the reason it does not;
    describe_kernel(case, inputs, backend) names the kernel PyTorch picks for a baseline, or
    remarks on a depsep backend ("" if there is nothing to say); default_batch is the batch by
    device type when --batch is not given; memory_modes are the modes whose peak memory is
    measured; tolerance_scale widens the check for deep computations (a whole model) whose
    rounding compounds; host_timed ops are timed by make_host_timer (the host's cost per call)
    instead of the device timer; whole_network ops have whole networks as layers: a table per
    network, rows per mode.
    """

    name: str
    modes: tuple[str, ...]
    layers: tuple[Any, ...]
    subset_layers: tuple[Any, ...]
    quick_layers: tuple[Any, ...]
    make_case: Callable[[Any, int, torch.dtype, str, str], Case]
    make_inputs: Callable[[Case, torch.device], Any]
    make_runner: Callable[[Case, Any, str], Runner]
    baselines: Mapping[str, Callable[[Case, torch.device], str | None]]
    default_batch: Mapping[str, int] = field(default_factory=lambda: {"cpu": 8, "cuda": 128})
    describe_kernel: Callable[[Case, Any, str], str] = lambda case, inputs, backend: ""
    memory_modes: tuple[str, ...] = ()
    tolerance_scale: float = 1.0
    host_timed: bool = False
    whole_network: bool = False

    def layer_set(self, name: str) -> tuple[Any, ...]:
        """The layers of a named set: "all", "subset" or "quick"."""
        return {"all": self.layers, "subset": self.subset_layers, "quick": self.quick_layers}[name]


def backend_availability(device: torch.device) -> dict[str, str | None]:
    """Depsep backend -> None if it is timed on the device, else why not."""
    availability = {
        name: reason
        for name, reason in kernels.available_backends(device).items()
        if name != REFERENCE
    }
    if device.type == "cpu" and "triton" in availability and availability["triton"] is None:
        # Triton on a CPU is its interpreter (TRITON_INTERPRET=1): a test aid, too slow to time.
        availability["triton"] = "Triton on CPU is the interpreter, for tests only"
    return availability


def make_cases(
    op: Op,
    layers: Sequence[Any],
    batch: int,
    dtypes: Sequence[torch.dtype],
    layouts: Sequence[str],
    modes: Sequence[str],
) -> list[Case]:
    """Cases ordered so that each table's rows (one per layer) run back to back."""
    modes = [mode for mode in modes if mode in op.modes]
    return [
        op.make_case(layer, batch, dtype, layout, mode)
        for mode, dtype, layout, layer in itertools.product(modes, dtypes, layouts, layers)
    ]


def layout_format(layout: str) -> torch.memory_format:
    return {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}[layout]


def conv_kernel_picked(input: torch.Tensor, weight: torch.Tensor, stride, padding, groups) -> str:
    """Which convolution kernel F.conv2d dispatches to for these tensors (cuDNN, PyTorch's CUDA
    depthwise kernel, oneDNN, ...), as PyTorch's own selection function reports it."""
    picked = torch._C._select_conv_backend(
        input, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups
    )
    return f"PyTorch picked its {picked.name} convolution"


def compile_reference(fn: Callable, backend: str) -> Callable:
    """torch.compile of a reference function or module for a compile baseline.

    Each case compiles afresh: reset drops the previous case's graphs, whose recompilations
    would otherwise hit dynamo's recompile limit (and then run eagerly) or turn shapes dynamic.
    """
    torch._dynamo.reset()
    return torch.compile(fn, mode=COMPILE_MODES[backend], dynamic=False)


def make_timer(device: torch.device, quick: bool) -> Callable[[Callable[[], Any]], Timing]:
    """Return the timing function for the device; each call warms up and then samples."""
    if device.type == "cuda":
        # Hundreds of samples for the microsecond kernels of a layer; at least _MIN_SAMPLES of a
        # model step; short enough for the ~500 timings of gpu-check.
        warmup_ms, rep_ms = (5, 10) if quick else (10, 50)

        def time_cuda(fn):
            rep = max(rep_ms, _MIN_SAMPLES * _cuda_call_ms(fn))
            if do_bench is None:
                return Timing.from_samples(_cuda_event_samples(fn, warmup_ms, rep))
            # do_bench flushes L2 before every call, so each call reads from DRAM.
            median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=[0.5, 0.2, 0.8])
            return Timing(median * 1e-3, p20 * 1e-3, p80 * 1e-3)

        return time_cuda

    def time_cpu(fn):
        # Timer defaults to one thread; measure with the threads the run was given.
        timer = torch.utils.benchmark.Timer(
            stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
        )
        if quick:  # a smoke run: a few single calls, no block-size search
            return Timing.from_samples([timer.timeit(1).median for _ in range(3)])
        start = time.perf_counter()
        fn()
        min_run_time = max(0.2, _MIN_SAMPLES * (time.perf_counter() - start))
        return Timing.from_samples(timer.blocked_autorange(min_run_time=min_run_time).times)

    return time_cpu


def make_host_timer(device: torch.device, quick: bool) -> Callable[[Callable[[], Any]], Timing]:
    """The timing function of host-cost measurements: on a CPU, torch.utils.benchmark on one
    thread; on a GPU, the wall time per call of back-to-back calls with one synchronisation at
    the end of each sample (the host's cost wherever it exceeds the device's)."""
    if device.type != "cuda":

        def time_cpu(fn):
            timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
            if quick:
                return Timing.from_samples([timer.timeit(10).median for _ in range(3)])
            return Timing.from_samples(timer.blocked_autorange(min_run_time=0.5).times)

        return time_cpu

    def time_loop(fn):
        calls, samples = (10, 3) if quick else (200, 7)
        fn()
        torch.cuda.synchronize()
        seconds = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            seconds.append((time.perf_counter() - start) / calls)
        return Timing.from_samples(seconds)

    return time_loop


def _cuda_call_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _cuda_event_samples(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's protocol with CUDA events, for machines without Triton: seconds per call."""
    l2_flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    estimate_ms = max(_cuda_call_ms(fn), 1e-3)
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


def measure_saved(fn: Callable[[], Any]) -> int:
    """The bytes autograd keeps for backward during one call: the storages of every tensor
    saved for backward (once each, whatever views of them were saved), but for those of the
    parameters and their views (and of a grad-requiring input), which live anyway, and for what
    a backward saves while it recomputes (freed as it finishes: the step's peak shows it). What
    activation memory a training step costs, apart from the allocator's reuse."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base  # a weight's transpose, say
        in_backward = torch._C._current_graph_task_id() != -1
        if not (in_backward or (base.is_leaf and base.requires_grad)):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def measure_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Memory of a call, in bytes: "saved_memory" (measure_saved; a separate call), then of one
    more call "step_memory", the most allocated at once above what was allocated when the call
    began (what the call itself needs: saved activations, gradients, workspaces), and on CUDA
    "peak_memory", torch.cuda.max_memory_allocated (all live tensors: also weights, optimizer
    state and the batch)."""
    return {"saved_memory": measure_saved(fn), **_measure_peak(fn, device)}


def _measure_peak(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory": peak, "step_memory": peak - start}
    # The CPU allocator keeps no peak counter, and the process's peak RSS hides reuse by malloc,
    # so replay the profiler's record of every allocation and free, in time order.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.typed[0] == _EventType.Allocation:
            deltas.append((node.start_time_ns, node.typed[1].alloc_size))  # negative: a free
        pending += node.children
    live = peak = 0
    for _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return {"step_memory": peak}


class Deadline:
    """The run's time limit: past it, no measurement starts (the rest is reported "skipped").

    A compile cannot be interrupted, so a compile baseline starts only with room for a cold
    compile left (guesses for the MobileNet V1 graphs on a large GPU host; tune them after a
    measured run).
    """

    _COMPILE_ROOM_S = {"compile": 15.0, "max-autotune": 120.0}

    def __init__(self, limit_s: float | None):
        self.limit_s = limit_s
        self._end = None if limit_s is None else time.monotonic() + limit_s

    def reason_to_skip(self, backend: str) -> str | None:
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        room = self._COMPILE_ROOM_S.get(backend, 0.0)
        if left > room:
            return None
        if room:
            return f"under {room:.0f} s of the time limit ({self.limit_s:.0f} s) left to compile"
        return f"time limit ({self.limit_s:.0f} s) reached"


def check_close(
    actual: Outputs, expected: Outputs, truth: Outputs, dtype: torch.dtype, scale: float = 1.0
) -> str | None:
    """None when a backend's outputs pass, else one line about the first that does not.

    `expected` holds the reference's outputs in the case's dtype, `truth` the reference's in
    float64 from the same inputs (or `expected` again: see run_case). Elements farther from the
    truth than the dtype's tolerance are misses. A correct kernel rounds differently from
    PyTorch, which flips the ReLU of values near zero and so changes some gradient elements by
    their full size; and in low precision PyTorch itself misses many elements of some gradients
    (measured in bfloat16: up to 11% of a BatchNorm bias gradient). So a backend passes with at
    most twice PyTorch's misses, or _ALLOWED_MISSES, whichever is more, and no non-finite value
    where the truth has none; a wrong kernel misses far more.
    """
    for name, reference in expected.items():
        tolerance = _TOLERANCE[dtype][name.startswith("grad_")] * scale
        value = actual.get(name)
        if value is None or value.shape != reference.shape or value.dtype != reference.dtype:
            got = "nothing" if value is None else f"{value.dtype} {tuple(value.shape)}"
            return f"{name}: got {got}, expected {reference.dtype} {tuple(reference.shape)}"
        exact = truth[name].double()
        if exact.numel() == 0:
            continue
        atol = tolerance * max(exact.abs().max().item(), 1.0)
        non_finite = (~value.isfinite() & exact.isfinite()).sum().item()
        if non_finite:
            return f"{name}: {non_finite} non-finite values where the reference is finite"

        reference_misses = _misses(reference, exact, tolerance, atol)
        allowed = max(_ALLOWED_MISSES[dtype], 2 * reference_misses)
        fraction = _misses(value, exact, tolerance, atol)
        if fraction > allowed:
            worst = (value.double() - exact).abs().max().item()
            return (
                f"{name}: {fraction:.2%} of the elements off the reference by more than "
                f"{atol:.3g} (torch itself: {reference_misses:.2%}, allowed {allowed:.2%}); "
                f"greatest difference {worst:.3g}"
            )
    return None


def _misses(x: torch.Tensor, exact: torch.Tensor, rtol: float, atol: float) -> float:
    """The fraction of x's elements off `exact` by more than the tolerance."""
    close = torch.isclose(x.double(), exact, rtol=rtol, atol=atol, equal_nan=True)
    return 1.0 - close.double().mean().item()


def _upcast(inputs: Any) -> Any:
    """An op's inputs record with every floating tensor and module in float64."""

    def upcast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.double()
        if isinstance(value, torch.nn.Module):
            return copy.deepcopy(value).double()
        return value

    fields = dataclasses.fields(inputs)
    return dataclasses.replace(inputs, **{f.name: upcast(getattr(inputs, f.name)) for f in fields})


def _outputs(runner: Runner) -> Outputs:
    # Copies: the running statistics of a training-mode runner move on at its next call.
    return {name: tensor.detach().clone() for name, tensor in runner().items()}


def run_case(
    op: Op,
    case: Case,
    backends: Sequence[str],
    device: torch.device,
    availability: Mapping[str, str | None],
    time_fn: Callable[[Callable[[], Any]], Timing],
    deadline: Deadline,
) -> list[Result]:
    """Check every backend against the reference, then time those that agree.

    The reference always runs (its outputs are the check), but is timed only when `backends`
    lists it: a later pass over the same case (the compile baselines) reuses its first timing.
    `availability` maps depsep backends to the reason they cannot run on this device (None: can).
    """
    reasons = {
        backend: op.baselines[backend](case, device)
        if backend in op.baselines
        else availability[backend]
        for backend in backends
        if backend != REFERENCE
    }
    if REFERENCE not in backends and all(reasons.values()):  # nothing to run: skip the reference
        return [Result(case, b, "unavailable", detail=reason) for b, reason in reasons.items()]
    late = deadline.reason_to_skip(REFERENCE)
    if late is not None:
        return [
            Result(case, b, "unavailable", detail=reasons[b])
            if reasons.get(b)
            else Result(case, b, "skipped", detail=late)
            for b in backends
        ]
    try:
        inputs = op.make_inputs(case, device)
        reference_runner = op.make_runner(case, inputs, REFERENCE)
        expected = _outputs(reference_runner)
        # The float64 truth for the half-precision dtypes, whose PyTorch results miss many
        # elements, and for the host-timed ops' tiny tensors, whose BatchNorms over a few
        # values per channel amplify float32 rounding; for other float32 cases the tolerance
        # covers PyTorch's own error, and float64 convolutions are very slow on a CPU (over a
        # minute for the model).
        wants_truth = case.dtype in (torch.float16, torch.bfloat16) or op.host_timed
        if not wants_truth or all(reasons.values()):
            truth = expected
        else:
            case64 = dataclasses.replace(case, dtype=torch.float64)
            truth = _outputs(op.make_runner(case64, _upcast(inputs), REFERENCE))
        results = []
        if REFERENCE in backends:
            results.append(_timed(op, case, inputs, REFERENCE, reference_runner, time_fn, device))
    except Exception as error:  # e.g. out of memory: report it and go on with the next case
        failed = f"the torch reference failed on this case: {_describe(error)}"
        return [
            Result(case, b, "failed" if b == REFERENCE else "unavailable", detail=failed)
            for b in backends
        ]
    del reference_runner  # frees the reference's autograd graph before the next backend builds one
    for backend in backends:
        if backend == REFERENCE:
            continue
        if reasons[backend] is not None:
            results.append(Result(case, backend, "unavailable", detail=reasons[backend]))
            continue
        reason = deadline.reason_to_skip(backend)
        if reason is not None:
            results.append(Result(case, backend, "skipped", detail=reason))
            continue
        results.append(
            _check_and_time(op, case, inputs, backend, (expected, truth), time_fn, device)
        )
    return results


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _timed(op, case, inputs, backend, runner, time_fn, device) -> Result:
    timing = time_fn(runner)
    remark = op.describe_kernel(case, inputs, backend)
    memory = {}
    if case.mode in op.memory_modes:
        try:
            memory = measure_memory(runner, device)
        except Exception as error:  # the CPU path reads profiler internals that may change
            remark = "; ".join(filter(None, [remark, f"memory not measured: {_describe(error)}"]))
    return Result(case, backend, "ok", timing, remark, memory)


def _check_and_time(op, case, inputs, backend, references, time_fn, device) -> Result:
    try:
        runner = op.make_runner(case, inputs, backend)
        mismatch = check_close(runner(), *references, case.dtype, op.tolerance_scale)
        if mismatch is not None:
            return Result(case, backend, "wrong", detail=mismatch)
        return _timed(op, case, inputs, backend, runner, time_fn, device)
    except Exception as error:  # a crashing backend is a result to report, not a reason to stop
        return Result(case, backend, "failed", detail=_describe(error))
