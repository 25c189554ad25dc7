"""PNG plots of a run, one file per op (so that a GPU run's folder stays within 8 files): a row of
two panels per table. Left, the median time per layer per backend (for the model, images/s per
mode); right, the fraction of the device's copy bandwidth each backend reaches (for the model,
the memory of its training step)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from bench.report import Group, Run, group_results  # noqa: E402


def write_plots(run: Run, out_dir: Path) -> list[Path]:
    groups_by_op: dict[str, list[Group]] = {}
    for group in group_results(run):
        groups_by_op.setdefault(group.cases[0].op, []).append(group)
    # One color per backend across every panel of the run.
    colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r.backend for r in run.results))}
    return [
        _plot(run, op, groups, colors, out_dir / f"{op}.png") for op, groups in groups_by_op.items()
    ]


def _plot(run: Run, op: str, groups: list[Group], colors: dict, path: Path) -> Path:
    fig, axes = plt.subplots(len(groups), 2, figsize=(16, 3.4 * len(groups)), squeeze=False)
    for (left, right), group in zip(axes, groups):
        first = group.cases[0]
        title = f"{op} {first.mode if group.by_layer else first.layer.name} | "
        title += f"{str(first.dtype).removeprefix('torch.')} | {first.layout}"
        if first.images:
            _bars(left, group, colors, lambda r: r.case.images / r.timing.median, "images/s")
        else:
            _bars(left, group, colors, lambda r: r.timing.median * 1e3, "median ms")
        left.set_yscale("log")
        left.yaxis.set_major_formatter(ScalarFormatter())
        left.yaxis.set_minor_formatter(ScalarFormatter())
        if first.min_bytes is not None:

            def copy_percent(r):
                return 100 * r.case.min_bytes / r.timing.median / 1e9 / run.copy_gbps

            _bars(right, group, colors, copy_percent, "% of copy bandwidth")
            right.axhline(100, color="grey", linewidth=0.8)
        elif any(r.memory for r in group.results):

            def step_mib(r):
                return r.memory["step_memory"] / 2**20 if "step_memory" in r.memory else None

            _bars(right, group, colors, step_mib, "training-step memory MiB")
        else:
            right.set_axis_off()
        left.set_title(title, fontsize=10)
        right.set_title(title, fontsize=10)
    fig.suptitle(f"{run.info.device_name} | torch {run.info.torch_version} | {run.info.timestamp}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _bars(ax, group: Group, colors: dict, value, ylabel: str) -> None:
    """Grouped bars: the group's rows (layers or modes) along x, one bar per backend that ran;
    value(result) is the bar's height (None: no bar)."""
    labels = list(dict.fromkeys(group.label(case) for case in group.cases))
    ran = {r.backend for r in group.results if r.status == "ok"}
    backends = [b for b in dict.fromkeys(r.backend for r in group.results) if b in ran]
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        points = [
            (labels.index(group.label(r.case)) + i * width, value(r))
            for r in group.results
            if r.backend == backend and r.status == "ok"
        ]
        points = [(x, y) for x, y in points if y is not None]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        ax.bar(xs, ys, width, label=backend, color=colors[backend])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    if backends:
        ax.legend(fontsize=8)
