"""Turn results into the terminal tables, the long-format CSV and the Markdown summary.

Derived metrics: speed-up = baseline median / backend median; bandwidth = the case's minimum
bytes / median time, also as a percentage of the tensor-copy bandwidth measured in the same run;
throughput = images per call / median time (the model). Their p20/p80 in the CSV vary the
measured backend's time only; memory metrics are one measurement.
"""

import csv
import math
import platform
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from operator import truediv
from pathlib import Path

import torch
from tabulate import tabulate

from bench.harness import REFERENCE, Case, Result, Timing

CSV_NAME = "results.csv"
SUMMARY_NAME = "summary.md"
CSV_COLUMNS = (
    "op",
    "layer",
    "shape",
    "backend",
    "dtype",
    "layout",
    "mode",
    "metric",
    "median",
    "p20",
    "p80",
    "unit",
    "device_name",
    "torch_version",
    "triton_version",
    "cuda_version",
    "git_commit",
    "timestamp",
)
_STATUS_CELL = {"wrong": "WRONG", "failed": "FAILED", "unavailable": "n/a", "skipped": "skipped"}
_STATUS_NOTE = {
    "wrong": "WRONG",
    "failed": "FAILED",
    "unavailable": "not run",
    "skipped": "skipped",
}
_MODE_LABELS = {("model", "forward+backward"): "train step", ("model", "eval"): "inference"}
_MEMORY_LABELS = {
    "saved_memory": "saved",
    "step_memory": "memory",
    "peak_memory": "peak memory",
}


@dataclass(frozen=True)
class RunInfo:
    device_name: str
    torch_version: str
    triton_version: str
    cuda_version: str
    git_commit: str
    timestamp: str
    threads: int
    command: str


@dataclass(frozen=True)
class Run:
    info: RunInfo
    copy_bytes: int
    copy_timing: Timing
    results: tuple[Result, ...]
    baselines: Mapping[str, tuple[str, ...]]  # op -> its baseline backends, REFERENCE first
    # ops whose "layers" are whole networks: a table per network, rows per mode
    whole_ops: frozenset[str] = frozenset()

    @property
    def copy_gbps(self) -> float:
        return self.copy_bytes / self.copy_timing.median / 1e9


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]


def collect_run_info(device: torch.device, command: str) -> RunInfo:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return RunInfo(
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        torch_version=torch.__version__,
        triton_version=triton_version,
        cuda_version=torch.version.cuda or "",
        git_commit=_git_commit(),
        timestamp=datetime.now().isoformat(timespec="seconds"),
        threads=torch.get_num_threads(),
        command=command,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 else "unknown"


def _gbps(case: Case, seconds: float) -> float:
    return case.min_bytes / seconds / 1e9


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _mode_label(case: Case) -> str:
    return _MODE_LABELS.get((case.op, case.mode), case.mode)


@dataclass(frozen=True)
class Group:
    """The results of one table (and one row of plot panels): per layer, or per mode."""

    by_layer: bool  # rows are layers (one mode); else modes (the model)
    results: list[Result]

    @property
    def cases(self) -> list[Case]:
        return list(dict.fromkeys(result.case for result in self.results))

    def label(self, case: Case) -> str:
        return case.layer.name if self.by_layer else _mode_label(case)


def group_results(run: Run) -> list[Group]:
    """The run's results by (op, mode, dtype, layout), rows per layer; those of a whole-network op
    by (op, network, dtype, layout), rows per mode."""
    groups: dict[tuple, Group] = {}
    for result in run.results:
        case = result.case
        by_layer = case.op not in run.whole_ops
        key = (case.op, case.mode if by_layer else case.layer.name, case.dtype, case.layout)
        groups.setdefault(key, Group(by_layer, [])).results.append(result)
    return list(groups.values())


def build_tables(run: Run) -> list[Table]:
    """One table per group: rows per layer then a geometric-mean row, or rows per backend."""
    return [
        _layer_table(run, group) if group.by_layer else _backend_table(run, group)
        for group in group_results(run)
    ]


def _title(run: Run, group: Group) -> str:
    first = group.cases[0]
    what = f"{first.op} {first.mode}" if group.by_layer else f"{first.op} {first.shape}"
    return (
        f"{what} | {_dtype_name(first.dtype)} | {first.layout} | batch {first.batch} | "
        f"{run.info.device_name}"
    )


def _shown_backends(run: Run, group: Group) -> tuple[list[str], list[str], list[str]]:
    """(every backend with a column, the baselines among them, the depsep ones). A backend that
    could run nowhere in this table gets a note, not a column of n/a."""
    results = group.results
    ran = {r.backend for r in results if r.status != "unavailable"}
    shown = [b for b in dict.fromkeys(r.backend for r in results) if b in ran]
    baselines = [b for b in run.baselines[results[0].case.op] if b in shown]
    return shown, baselines, [b for b in shown if b not in baselines]


def _layer_table(run: Run, group: Group) -> Table:
    by_key = {(result.case, result.backend): result for result in group.results}
    cases = group.cases
    shown, baselines, depsep = _shown_backends(run, group)
    with_bandwidth = cases[0].min_bytes is not None

    headers = ["layer", "shape"]
    headers += [f"{b} ms" for b in shown]
    headers += [f"{b} vs {a}" for b in depsep for a in baselines]
    if with_bandwidth:
        headers += [f"{b} GB/s (% copy)" for b in shown]

    speedups = {(b, a): [] for b in depsep for a in baselines}
    bandwidths = {b: [] for b in shown}
    rows = []
    for case in cases:
        row = [group.label(case), case.shape]
        row += [_time_cell(by_key[case, b]) for b in shown]
        for b in depsep:
            for a in baselines:
                fast, base = by_key[case, b], by_key[case, a]
                if fast.status == "ok" and base.status == "ok":
                    speedups[b, a].append(base.timing.median / fast.timing.median)
                    row.append(f"{speedups[b, a][-1]:.2f}x")
                else:  # says why: this backend's status, or n/a when the baseline did not run
                    row.append(_STATUS_CELL.get(fast.status, "n/a"))
        for b in shown if with_bandwidth else ():
            result = by_key[case, b]
            if result.status == "ok":
                bandwidths[b].append(_gbps(case, result.timing.median))
                row.append(_bandwidth_cell(bandwidths[b][-1], run.copy_gbps))
            else:
                row.append(_STATUS_CELL[result.status])
        rows.append(row)

    # A geometric mean over fewer rows than the table's says over how many.
    def mean_cell(values: list[float], cell) -> str:
        value = _geomean(values)
        if value is None:
            return ""
        return cell(value) + ("" if len(values) == len(cases) else f" ({len(values)})")

    if len(cases) > 1:
        geomean_row = ["geomean", f"{len(cases)} layers"] + [""] * len(shown)
        geomean_row += [
            mean_cell(speedups[b, a], "{:.2f}x".format) for b in depsep for a in baselines
        ]
        if with_bandwidth:
            geomean_row += [
                mean_cell(bandwidths[b], lambda v: _bandwidth_cell(v, run.copy_gbps)) for b in shown
            ]
        rows.append(geomean_row)
    return Table(_title(run, group), headers, rows, _notes(group))


def _backend_table(run: Run, group: Group) -> Table:
    """Rows per backend, columns per mode: time (images/s for the model), speed-up over each
    baseline, bandwidth, and the memory of the modes that measure it."""
    by_key = {(result.case, result.backend): result for result in group.results}
    cases = group.cases
    shown, baselines, _ = _shown_backends(run, group)
    memory_metrics = list(
        dict.fromkeys(metric for result in group.results for metric in result.memory)
    )
    headers = ["backend"]
    for case in cases:
        mode = group.label(case)
        headers.append(f"{mode} images/s" if case.images else f"{mode} ms")
        headers += [f"{mode} vs {a}" for a in baselines]
        if case.min_bytes is not None:
            headers.append(f"{mode} GB/s (% copy)")
        if any(by_key[case, b].memory for b in shown):
            headers += [f"{mode} {_MEMORY_LABELS[metric]} MiB" for metric in memory_metrics]
    rows = []
    for b in shown:
        row = [b]
        for case in cases:
            result = by_key[case, b]
            ok = result.status == "ok"
            if not ok:
                row.append(_STATUS_CELL[result.status])
            elif case.images:
                row.append(f"{case.images / result.timing.median:.1f}")
            else:
                row.append(_time_cell(result))
            for a in baselines:
                base = by_key[case, a]
                if a != b and ok and base.status == "ok":
                    row.append(f"{base.timing.median / result.timing.median:.2f}x")
                else:
                    row.append("")
            if case.min_bytes is not None:
                gbps = _gbps(case, result.timing.median) if ok else None
                row.append("" if gbps is None else _bandwidth_cell(gbps, run.copy_gbps))
            if any(by_key[case, other].memory for other in shown):
                for metric in memory_metrics:
                    row.append(_memory_cell(result, by_key.get((case, REFERENCE)), metric))
        rows.append(row)
    return Table(_title(run, group), headers, rows, _notes(group))


def _memory_cell(result: Result, reference: Result | None, metric: str) -> str:
    """MiB, and beside any other backend's the ratio to the reference's."""
    value = result.memory.get(metric)
    base = reference.memory.get(metric) if reference is not None else None
    if value is None:
        return ""
    if result is reference or not base:
        return f"{value / 2**20:.1f}"
    return f"{value / 2**20:.1f} ({value / base:.2f}x)"


def _time_cell(result: Result) -> str:
    if result.status != "ok":
        return _STATUS_CELL[result.status]
    return f"{result.timing.median * 1e3:.4g}"


def _bandwidth_cell(gbps: float, copy_gbps: float) -> str:
    return f"{gbps:.1f} ({100 * gbps / copy_gbps:.0f}%)"


def _notes(group: Group) -> list[str]:
    """One line per (backend, status, reason or remark), naming the rows it applies to."""
    results = group.results
    backend_order = {b: i for i, b in enumerate(dict.fromkeys(r.backend for r in results))}
    rows_by_reason: dict[tuple[str, str, str], list[str]] = {}
    # A stable sort: within a backend the rows stay in table order.
    for result in sorted(results, key=lambda result: backend_order[result.backend]):
        if result.status != "ok" or result.detail:
            key = (result.backend, result.status, result.detail)
            rows_by_reason.setdefault(key, []).append(group.label(result.case))
    all_rows = list(dict.fromkeys(group.label(case) for case in group.cases))
    notes = []
    for (backend, status, detail), rows in rows_by_reason.items():
        rows = list(dict.fromkeys(rows))
        where = (
            ("all layers" if group.by_layer else "all modes")
            if rows == all_rows
            else ", ".join(rows)
        )
        if status == "ok":
            notes.append(f"{backend} ({where}): {detail}")
        else:
            notes.append(f"{backend}: {_STATUS_NOTE[status]} ({where}): {detail}")
    return notes


def print_tables(run: Run) -> None:
    info = run.info
    triton_version = info.triton_version or "-"
    print(
        f"\n{info.device_name} | torch {info.torch_version} | triton {triton_version} | "
        f"{info.threads} threads | copy bandwidth {run.copy_gbps:.1f} GB/s"
    )
    for table in build_tables(run):
        print(f"\n{table.title}")
        print(tabulate(table.rows, table.headers, tablefmt="simple", disable_numparse=True))
        for note in table.notes:
            print(f"  {note}")


def _csv_rows(run: Run):
    info = run.info
    common = {
        "device_name": info.device_name,
        "torch_version": info.torch_version,
        "triton_version": info.triton_version,
        "cuda_version": info.cuda_version,
        "git_commit": info.git_commit,
        "timestamp": info.timestamp,
    }
    copy_row = {"op": "copy", "shape": f"{run.copy_bytes // 2} bytes", "backend": REFERENCE}
    copy_metrics = {
        "time": ("ms", _to_ms),
        "bandwidth": ("GB/s", lambda seconds: run.copy_bytes / seconds / 1e9),
    }
    yield from _metric_rows({**copy_row, **common}, run.copy_timing, copy_metrics)

    by_key = {(result.case, result.backend): result for result in run.results}
    for result in run.results:
        case = result.case
        row = {
            "op": case.op,
            "layer": case.layer.name,
            "shape": case.shape,
            "backend": result.backend,
            "dtype": _dtype_name(case.dtype),
            "layout": case.layout,
            "mode": case.mode,
            **common,
        }
        if result.status == "ok":
            yield from _metric_rows(row, result.timing, _result_metrics(run, result, by_key))
            for metric, nbytes in result.memory.items():  # one measurement: no spread
                mib = nbytes / 2**20
                yield {
                    **row,
                    "metric": metric,
                    "unit": "MiB",
                    "median": mib,
                    "p20": mib,
                    "p80": mib,
                }
        else:
            yield {**row, "metric": result.status}


def _result_metrics(run: Run, result: Result, by_key: dict) -> dict[str, tuple[str, Callable]]:
    """metric -> (unit, function of seconds per call)."""
    case = result.case
    metrics = {"time": ("ms", _to_ms)}
    if case.min_bytes is not None:
        gbps = partial(_gbps, case)
        metrics["bandwidth"] = ("GB/s", gbps)
        metrics["copy_fraction"] = ("%", lambda seconds: 100 * gbps(seconds) / run.copy_gbps)
    if case.images:
        metrics["throughput"] = ("images/s", partial(truediv, case.images))
    for baseline in run.baselines[case.op]:
        base = by_key.get((case, baseline))
        if baseline != result.backend and base is not None and base.status == "ok":
            metrics[f"speedup_vs_{baseline}"] = ("x", partial(truediv, base.timing.median))
    return metrics


def _metric_rows(row: dict, timing: Timing, metrics: dict[str, tuple[str, Callable]]):
    for metric, (unit, of_seconds) in metrics.items():
        # A metric that falls as time rises (bandwidth, speed-up) swaps the time quantiles.
        low, high = sorted((of_seconds(timing.p20), of_seconds(timing.p80)))
        median = of_seconds(timing.median)
        yield {**row, "metric": metric, "unit": unit, "median": median, "p20": low, "p80": high}


def _to_ms(seconds: float) -> float:
    return seconds * 1e3


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_csv(run: Run, path: Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(_csv_rows(run))


def write_markdown(run: Run, path: Path) -> None:
    info = run.info
    lines = [
        f"# Benchmark: {info.device_name}",
        "",
        f"- command: `{info.command}`",
        f"- torch {info.torch_version}, triton {info.triton_version or '-'}, "
        f"CUDA {info.cuda_version or '-'}, {info.threads} CPU threads",
        f"- git commit `{info.git_commit}`, {info.timestamp}",
        f"- tensor copy bandwidth: {run.copy_gbps:.1f} GB/s (the 100% of the % copy columns)",
        "",
        "Times are medians in ms. Speed-up = baseline median / backend median. GB/s counts "
        "the minimum bytes: each input read once, each output written once (each op's "
        "formula per mode is in the docstring of its bench/ module). Memory: what autograd "
        "saved for backward (saved: every saved tensor's storage once, parameters not "
        "counted), the most allocated at once during one training step above what was "
        "allocated before it (memory), and on CUDA torch.cuda.max_memory_allocated (peak "
        "memory); in parentheses the ratio to torch's. Every backend was checked "
        "against torch before it was timed (WRONG: it disagreed). Quantiles in "
        f"[{CSV_NAME}]({CSV_NAME}).",
    ]
    for table in build_tables(run):
        lines += [
            "",
            f"## {table.title}",
            "",
            tabulate(table.rows, table.headers, tablefmt="github", disable_numparse=True),
        ]
        if table.notes:
            lines += [""] + [f"- {note}" for note in table.notes]
    path.write_text("\n".join(lines) + "\n")
