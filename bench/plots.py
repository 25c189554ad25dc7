"""PNG plots of a run: per op, time per layer per backend and the fraction of the device's
copy bandwidth each backend reaches; one panel per (mode, dtype, layout), as the tables."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from bench.report import Run, group_results  # noqa: E402


def write_plots(run: Run, out_dir: Path) -> list[Path]:
    panels_by_op: dict[str, list] = {}
    for (op, mode, dtype, layout), results in group_results(run).items():
        title = f"{mode} | {str(dtype).removeprefix('torch.')} | {layout}"
        panels_by_op.setdefault(op, []).append((title, results))
    paths = []
    for op, panels in panels_by_op.items():
        paths.append(_plot(run, op, panels, "time", out_dir / f"{op}_time.png"))
        paths.append(_plot(run, op, panels, "bandwidth", out_dir / f"{op}_bandwidth.png"))
    return paths


def _plot(run: Run, op: str, panels: list, metric: str, path: Path) -> Path:
    """Grouped bars: layers along x, one bar per backend that ran; time in ms (log scale) or
    achieved bandwidth as % of the measured copy bandwidth."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (title, results) in zip(axes[:, 0], panels):
        layers = list(dict.fromkeys(r.case.layer.name for r in results))
        backends = list(dict.fromkeys(r.backend for r in results if r.status == "ok"))
        width = 0.8 / max(1, len(backends))
        for i, backend in enumerate(backends):
            xs, ys = [], []
            for r in results:
                if r.backend != backend or r.status != "ok":
                    continue
                xs.append(layers.index(r.case.layer.name) + i * width)
                seconds = r.timing.median
                ys.append(
                    seconds * 1e3
                    if metric == "time"
                    else 100 * r.case.min_bytes / seconds / 1e9 / run.copy_gbps
                )
            ax.bar(xs, ys, width, label=backend)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))], layers)
        ax.set_title(f"{op} {title}", fontsize=10)
        if metric == "time":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.set_ylabel("median ms")
        else:
            ax.set_ylabel("% of copy bandwidth")
            ax.axhline(100, color="grey", linewidth=0.8)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run.info.device_name} | torch {run.info.torch_version} | {run.info.timestamp}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
