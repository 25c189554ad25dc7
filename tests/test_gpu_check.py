"""`make gpu-check`'s script in its --dry mode, which runs on any machine: the plan (build, each
test file with GPU tests in its own process, native before Triton, the sanitizer, the
benchmarks), one folder of at most 8 files, and how the steps' statuses make the check's."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--dry", "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_dry_run_plans_every_step_and_writes_one_summary(tmp_path):
    (tmp_path / "summary.md").write_text("an earlier run's")
    done = _dry(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check: passed")
    assert "an earlier run's" not in summary
    steps = [
        line.split(" | ")[0].lstrip("| ") for line in summary.splitlines() if "| dry |" in line
    ]
    assert steps[0] == "build" and steps[-1] == "bench"
    assert steps.index("tests native test_depthwise") == 1
    natives = [i for i, s in enumerate(steps) if s.startswith("tests native")]
    tritons = [i for i, s in enumerate(steps) if s.startswith("tests triton")]
    assert natives and tritons and max(natives) < min(tritons)
    assert {"memcheck", "racecheck gemm"} <= set(steps)
    assert "-m gpu" in summary and "--time-limit" in summary


def test_a_failing_test_file_fails_the_check_but_the_benchmarks_still_run(tmp_path):
    done = _dry(tmp_path, "--dry-fail", "tests native test_fused")
    assert done.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check: failed")
    assert "| tests native test_fused | failed |" in summary
    assert "| bench | dry |" in summary


def test_statuses_combine_into_the_checks():
    """A build, test or sanitizer step that failed fails the check, and so does a build or test
    step that timed out; the benchmarks, a sanitizer run cut by its time cap and a step left out
    for lack of time do not."""
    gpu_check = _load()
    steps = gpu_check.plan("python", "9.0", "compute-sanitizer", Path("out"))
    assert [s.kind for s in steps][:2] == ["build", "tests"] and steps[-1].kind == "bench"
    for step in steps:
        step.status = "passed"
    assert gpu_check.combine(steps) == "passed"
    steps[-1].status = "failed"
    assert gpu_check.combine(steps) == "passed"
    for index in (0, 1, -2):
        for status in ("failed", "timeout"):
            steps[index].status = status
            fails = status == "failed" or steps[index].kind != "sanitizer"
            assert gpu_check.combine(steps) == ("failed" if fails else "passed"), steps[index].name
        steps[index].status = "not run"
        assert gpu_check.combine(steps) == "passed"


def test_a_failed_build_runs_no_test(tmp_path):
    done = _dry(tmp_path, "--dry-fail", "build")
    assert done.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests native test_depthwise | not run |" in summary
    assert "| memcheck | not run |" in summary and "| bench | not run |" in summary


def test_the_runner_reads_exit_statuses_and_kills_a_step_past_its_timeout():
    gpu_check = _load()
    runner = gpu_check.Runner(dry=False, dry_fail=[], start=0.0)

    def run(code, timeout_s=30.0):
        step = gpu_check.Step("s", "tests", [sys.executable, "-c", code], empty_status=5)
        runner.run(step, timeout_s)
        return step

    assert run("print('fine')").status == "passed"
    assert run("import sys; sys.exit(5)").status == "empty"
    failed = run("import sys; print('broken'); sys.exit(2)")
    assert failed.status == "failed" and "broken" in failed.log and "exit status 2" in failed.log
    # A child that outlives its parent's kill would keep the pipe open: the group dies.
    slow = run(
        "import subprocess, sys, time; print('started', flush=True);"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
        timeout_s=2.0,
    )
    assert slow.status == "timeout" and "started" in slow.log and slow.seconds < 20
