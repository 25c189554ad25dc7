"""`make gpu-check`: on a GPU machine, with its own Python and torch (nothing installed), in at
most 8 minutes: build for this GPU's architecture only, run the GPU tests (each test file in its
own process under a timeout, the native CUDA tests of every file before the Triton ones), run
compute-sanitizer's memcheck on one forward and backward of each native op and racecheck on the
1x1 GEMM (when compute-sanitizer is installed), then the benchmarks in what time is left. The
benchmarks run even when a test fails (their numbers are still wanted); the exit status is the
checks' (build, tests, sanitizer). Everything goes into one folder, bench/results/<date>-gpu:
the benchmark's results.csv and PNGs, and summary.md, which starts with this check's steps and
their statuses and ends with their logs: at most 8 files.

--dry runs on any machine: the same plan, folder and summary, with every GPU step recorded as
not run; --dry-fail NAME makes the step NAME (or every step whose name starts with it) fail
there, to exercise how statuses combine.
"""

import argparse
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0  # the whole check
BUILD_S = 300.0  # at most, of what is left after the reserves below
TESTS_END_S = 330.0  # no test file starts later than this many seconds into the check
FILE_S = 150.0  # one test file's process at most
MEMCHECK_S = 75.0
RACECHECK_S = 45.0
SANITIZER_END_S = 400.0  # the sanitizer runs end by then
BENCH_RESERVE_S = 40.0  # after the bench's time limit: its last measurement and its files
MAX_FILES = 8
LOG_TAIL_LINES = 200
REQUIRED = ("ninja", "pytest")  # ninja: the build's (torch looks for its executable)
BENCH_MODULES = ("tqdm", "tabulate", "matplotlib")
# Files with the native CUDA kernels' own tests first; the rest in name order.
FIRST = ("test_depthwise.py", "test_fused.py", "test_bad_input.py", "test_chain.py")
CHECKS = ("build", "tests", "sanitizer")  # the kinds of step whose failure fails the check


@dataclasses.dataclass
class Step:
    name: str
    kind: str  # build | tests | sanitizer | bench
    command: list[str]
    timeout_s: float | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Exit status meaning "nothing to run" rather than a failure (pytest: 5, no test selected).
    empty_status: int | None = None
    status: str = "pending"  # passed | failed | timeout | empty | not run | dry
    seconds: float = 0.0
    log: str = ""


def combine(steps: list[Step]) -> str:
    """The check's status: "failed" when a build, test or sanitizer step failed, or a build or
    test step ran out of time (a hang fails); "passed" otherwise. A sanitizer run cut by its
    time cap, a step not run for lack of time and the benchmarks are reported, never failed."""

    def bad(step):
        return step.status == "failed" or (step.status == "timeout" and step.kind != "sanitizer")

    return "failed" if any(s.kind in CHECKS and bad(s) for s in steps) else "passed"


def test_files() -> list[Path]:
    """Test files that have GPU tests: they mark some test gpu (directly or through
    tests/common.py's backend_param(s) on "cuda")."""
    files = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        text = path.read_text()
        if "mark.gpu" in text or '"cuda"' in text:
            files.append(path)
    rank = {name: i for i, name in enumerate(FIRST)}
    return sorted(files, key=lambda p: (rank.get(p.name, len(FIRST)), p.name))


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "compute-sanitizer").is_file():
            return str(Path(home, "bin", "compute-sanitizer"))
    return None


def plan(python: str, arch: str, sanitizer: str | None, out_dir: Path) -> list[Step]:
    steps = [
        Step(
            "build",
            "build",
            [python, "setup.py", "--quiet", "build_ext", "--inplace"],
            BUILD_S,
            {"TORCH_CUDA_ARCH_LIST": arch},
        )
    ]
    files = test_files()
    for phase, selection in (("native", "not triton"), ("triton", "triton")):
        for path in files:
            if phase == "triton" and "triton" not in path.read_text():
                continue
            rel = str(path.relative_to(ROOT))
            steps.append(
                Step(
                    f"tests {phase} {path.stem}",
                    "tests",
                    [python, "-m", "pytest", rel, "-q", "-m", "gpu", "-k", selection],
                    FILE_S,
                    empty_status=5,
                )
            )
    if sanitizer:
        driver = str(ROOT / ".ci" / "sanitizer_ops.py")
        common = [sanitizer, "--error-exitcode", "1", "--target-processes", "all"]
        # Each tensor its own allocation: inside the caching allocator's blocks an access past
        # a tensor's end would land in memory memcheck counts as allocated. PYTHONPATH: the
        # driver, a script in .ci/, imports kernels from the checkout.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONPATH": path}
        steps.append(
            Step(
                "memcheck",
                "sanitizer",
                [*common, "--tool", "memcheck", python, driver],
                MEMCHECK_S,
                no_cache,
            )
        )
        steps.append(
            Step(
                "racecheck gemm",
                "sanitizer",
                [*common, "--tool", "racecheck", python, driver, "--gemm"],
                RACECHECK_S,
                no_cache,
            )
        )
    bench = [python, "-m", "bench", "--device", "cuda", "--no-progress", "--out", str(out_dir)]
    steps.append(Step("bench", "bench", bench))
    return steps


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    parts = text.splitlines()
    if len(parts) <= lines:
        return text
    return f"[... {len(parts) - lines} lines left out ...]\n" + "\n".join(parts[-lines:])


class Runner:
    def __init__(self, dry: bool, dry_fail: list[str], start: float):
        self.dry, self.dry_fail, self.start = dry, dry_fail, start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return BUDGET_S - self.elapsed()

    def run(self, step: Step, timeout_s: float | None, not_after_s: float | None = None) -> None:
        """Runs the step within timeout_s, unless the check is past not_after_s already."""
        if not_after_s is not None and self.elapsed() > not_after_s:
            step.status, step.log = "not run", f"no time left ({self.elapsed():.0f} s in)"
            return
        if timeout_s is not None and timeout_s <= 0:
            step.status, step.log = "not run", "no time left"
            return
        began = time.monotonic()
        if self.dry:
            failing = any(step.name.startswith(name) for name in self.dry_fail)
            step.status = "failed" if failing else "dry"
            step.log = f"dry run: {' '.join(step.command)} (timeout {timeout_s or 0:.0f} s)"
        else:
            # A session of its own: a timeout kills the step's whole process group (pytest's
            # workers, the python under compute-sanitizer), not just its first process.
            with subprocess.Popen(
                step.command,
                cwd=ROOT,
                env={**os.environ, **step.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            ) as process:
                try:
                    step.log, _ = process.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    step.log, _ = process.communicate()
                    step.log += f"\n[timed out after {timeout_s:.0f} s]"
                    step.status = "timeout"
            if step.status != "timeout":
                if process.returncode == 0:
                    step.status = "passed"
                elif process.returncode == step.empty_status:
                    step.status = "empty"
                else:
                    step.status = "failed"
                    step.log += f"\n[exit status {process.returncode}]"
        step.seconds = time.monotonic() - began
        print(f"[{self.elapsed():5.0f} s] {step.name}: {step.status} ({step.seconds:.0f} s)")


def missing_modules(names) -> list[str]:
    def found(name):
        return importlib.util.find_spec(name) is not None or (
            name == "ninja" and shutil.which("ninja") is not None
        )

    return [name for name in names if not found(name)]


def gpu_arch() -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST value, device name) of GPU 0."""
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device (try --dry)")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}", torch.cuda.get_device_name(0)


def write_summary(out_dir: Path, steps: list[Step], header: list[str], status: str) -> None:
    """summary.md: this check's table and notes, the benchmark's summary (if it wrote one),
    then each step's log (the tail of a long one)."""
    summary = out_dir / "summary.md"
    bench_text = summary.read_text() if summary.exists() else "(the benchmark wrote nothing)\n"
    lines = [f"# GPU check: {status}", "", *header, ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]
    lines += ["", "# Benchmarks", "", bench_text.rstrip(), "", "# Logs", ""]
    for s in steps:
        lines += [f"## {s.name}: {s.status}", "", "```", tail(s.log.rstrip()), "```", ""]
    summary.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="plan and report, run no GPU step")
    parser.add_argument("--dry-fail", action="append", default=[], metavar="NAME")
    parser.add_argument("--out", type=Path, help="default: bench/results/<date>-gpu")
    args = parser.parse_args(argv)
    runner = Runner(args.dry, args.dry_fail, time.monotonic())
    out_dir = args.out or ROOT / "bench" / "results" / f"{date.today().isoformat()}-gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in (*out_dir.glob("*.png"), out_dir / "results.csv", out_dir / "summary.md"):
        old.unlink(missing_ok=True)  # an earlier run's files
    header = []

    missing = missing_modules(REQUIRED)
    if missing:
        sys.exit(f"gpu-check: {', '.join(missing)} missing: pip install {' '.join(missing)}")
    no_bench = missing_modules(BENCH_MODULES)
    arch, device = ("dry", "none (dry run)") if args.dry else gpu_arch()
    sanitizer = find_sanitizer() if not args.dry else "compute-sanitizer"
    header.append(f"- device: {device}; TORCH_CUDA_ARCH_LIST={arch}; python {sys.executable}")
    header.append(f"- compute-sanitizer: {sanitizer or 'not found, its steps left out'}")
    steps = plan(sys.executable, arch, sanitizer, out_dir)

    build = steps[0]
    runner.run(build, min(BUILD_S, runner.left() - BENCH_RESERVE_S))
    built = build.status in ("passed", "dry")
    for step in steps[1:]:
        if not built and step.kind != "bench":
            step.status, step.log = "not run", "the build failed"
        elif step.kind == "tests":
            runner.run(step, min(FILE_S, TESTS_END_S - runner.elapsed()), TESTS_END_S)
        elif step.kind == "sanitizer":
            runner.run(step, min(step.timeout_s, SANITIZER_END_S - runner.elapsed()))
        elif no_bench:
            step.status, step.log = "not run", f"{', '.join(no_bench)} missing"
        elif not built:
            step.status, step.log = "not run", "the build failed"
        else:
            limit = runner.left() - BENCH_RESERVE_S
            step.command += ["--time-limit", f"{max(limit, 0):.0f}"]
            runner.run(step, limit + BENCH_RESERVE_S - 5 if limit > 0 else 0)

    status = combine(steps)
    write_summary(out_dir, steps, header, status)
    files = sorted(p.name for p in out_dir.iterdir())
    if len(files) > MAX_FILES:
        print(f"gpu-check: {out_dir} holds {len(files)} files, more than {MAX_FILES}: {files}")
    print(f"gpu-check: {status} in {runner.elapsed():.0f} s; {len(files)} files in {out_dir}")
    return 0 if status == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
