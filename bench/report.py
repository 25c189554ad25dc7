"""Turn results into the terminal tables, the long-format CSV and the Markdown summary.

Derived metrics: speed-up = baseline median / backend median; bandwidth = the case's minimum
bytes / median time, also as a percentage of the tensor-copy bandwidth measured in the same run.
Their p20/p80 in the CSV vary the measured backend's time only.
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
_STATUS_CELL = {"wrong": "WRONG", "failed": "FAILED", "unavailable": "n/a"}
_STATUS_NOTE = {"wrong": "WRONG", "failed": "FAILED", "unavailable": "not run"}


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


def group_results(run: Run) -> dict[tuple, list[Result]]:
    """The run's results by (op, mode, dtype, layout): one table, or one plot panel, each."""
    groups: dict[tuple, list[Result]] = {}
    for result in run.results:
        case = result.case
        groups.setdefault((case.op, case.mode, case.dtype, case.layout), []).append(result)
    return groups


def build_tables(run: Run) -> list[Table]:
    """One table per (op, mode, dtype, layout), one row per layer, then a geometric-mean row."""
    return [_build_table(run, results) for results in group_results(run).values()]


def _build_table(run: Run, results: list[Result]) -> Table:
    by_key = {(result.case, result.backend): result for result in results}
    cases = list(dict.fromkeys(result.case for result in results))
    # A backend that could run nowhere in this table gets a note, not a column of n/a.
    shown = list(dict.fromkeys(r.backend for r in results if r.status != "unavailable"))
    baselines = [b for b in run.baselines[cases[0].op] if b in shown]
    depsep = [b for b in shown if b not in baselines]

    headers = ["layer", "shape"]
    headers += [f"{b} ms" for b in shown]
    headers += [f"{b} vs {a}" for b in depsep for a in baselines]
    headers += [f"{b} GB/s (% copy)" for b in shown]

    speedups = {(b, a): [] for b in depsep for a in baselines}
    bandwidths = {b: [] for b in shown}
    rows = []
    for case in cases:
        row = [case.layer.name, case.shape]
        row += [_time_cell(by_key[case, b]) for b in shown]
        for b in depsep:
            for a in baselines:
                fast, base = by_key[case, b], by_key[case, a]
                if fast.status == "ok" and base.status == "ok":
                    speedups[b, a].append(base.timing.median / fast.timing.median)
                    row.append(f"{speedups[b, a][-1]:.2f}x")
                else:  # says why: this backend's status, or n/a when the baseline did not run
                    row.append(_STATUS_CELL.get(fast.status, "n/a"))
        for b in shown:
            result = by_key[case, b]
            if result.status == "ok":
                bandwidths[b].append(_gbps(case, result.timing.median))
                row.append(_bandwidth_cell(bandwidths[b][-1], run.copy_gbps))
            else:
                row.append(_STATUS_CELL[result.status])
        rows.append(row)

    geomean_row = ["geomean", f"{len(cases)} layers"] + [""] * len(shown)
    for b in depsep:
        for a in baselines:
            value = _geomean(speedups[b, a])
            geomean_row.append("" if value is None else f"{value:.2f}x")
    for b in shown:
        value = _geomean(bandwidths[b])
        geomean_row.append("" if value is None else _bandwidth_cell(value, run.copy_gbps))
    rows.append(geomean_row)

    first = cases[0]
    title = (
        f"{first.op} {first.mode} | {_dtype_name(first.dtype)} | {first.layout} | "
        f"batch {first.batch} | {run.info.device_name}"
    )
    return Table(title, headers, rows, _notes(results))


def _time_cell(result: Result) -> str:
    if result.status != "ok":
        return _STATUS_CELL[result.status]
    return f"{result.timing.median * 1e3:.4g}"


def _bandwidth_cell(gbps: float, copy_gbps: float) -> str:
    return f"{gbps:.1f} ({100 * gbps / copy_gbps:.0f}%)"


def _notes(results: list[Result]) -> list[str]:
    """One line per (backend, status, reason), naming the layers it applies to."""
    backend_order = {b: i for i, b in enumerate(dict.fromkeys(r.backend for r in results))}
    layers_by_reason: dict[tuple[str, str, str], list[str]] = {}
    # A stable sort: within a backend the layers stay in table order.
    for result in sorted(results, key=lambda result: backend_order[result.backend]):
        if result.status != "ok":
            key = (result.backend, result.status, result.detail)
            layers_by_reason.setdefault(key, []).append(result.case.layer.name)
    all_layers = list(dict.fromkeys(result.case.layer.name for result in results))
    notes = []
    for (backend, status, detail), layers in layers_by_reason.items():
        where = "all layers" if layers == all_layers else ", ".join(layers)
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


def write_outputs(run: Run, out_dir: Path) -> list[Path]:
    """Write the run's files into out_dir: the CSV, the Markdown summary and, per op, two PNG
    plots (time per layer per backend; fraction of copy bandwidth)."""
    from bench.plots import write_plots  # matplotlib only when files are written

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, summary_path = out_dir / CSV_NAME, out_dir / SUMMARY_NAME
    write_csv(run, csv_path)
    write_markdown(run, summary_path)
    return [csv_path, summary_path, *write_plots(run, out_dir)]


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
        else:
            yield {**row, "metric": result.status}


def _result_metrics(run: Run, result: Result, by_key: dict) -> dict[str, tuple[str, Callable]]:
    """metric -> (unit, function of seconds per call)."""
    case = result.case
    gbps = partial(_gbps, case)
    metrics = {
        "time": ("ms", _to_ms),
        "bandwidth": ("GB/s", gbps),
        "copy_fraction": ("%", lambda seconds: 100 * gbps(seconds) / run.copy_gbps),
    }
    baselines = run.baselines[case.op]
    if result.backend not in baselines:
        for baseline in baselines:
            base = by_key.get((case, baseline))
            if base is not None and base.status == "ok":
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
        "the minimum bytes: each input read once, each output written once. Quantiles in "
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
