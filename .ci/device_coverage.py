"""`make coverage`: which lines of the device code the CPU tests execute.

The device code is every source nvcc compiles: the csrc/ .cu files and every csrc/ header they
include, directly or not. Most of it is single-source (DEPSEP_HD thread programs, block programs,
op bodies) and also runs on the host through the CPU and depsep_host ops; the CUDA-only files
(.cu registrations and cuda_*.cuh launchers: __global__ wrappers, launch code) cannot.

Steps: copy the checkout's files into build/coverage/src (so the normal build stays as it is;
unchanged files keep their timestamps, so ninja rebuilds only what changed), build it there
CPU-only at -O0 with gcov instrumentation (DEPSEP_COVERAGE=1 DEPSEP_SKIP_CUDA_BUILD=1), run the
test suite there (DEFAULT_PYTEST, or the pytest arguments given after --), then read gcov's JSON
records of every object file and report per device-code file its executed and executable lines,
the executable lines never executed, and two totals:
- device code executed by CPU tests: over the host-compiled device code (what gcov sees);
- all device code: the same with the CUDA-only files' code lines counted as not executed.

gcov knows only code the host compiles: lines under `#ifdef __CUDA_ARCH__` and function
templates no host translation unit instantiates are not in its records, so they count in
neither total. And GCC gives code in a macro's arguments the macro's line: the body of an
AT_DISPATCH_* lambda in the op bodies counts as one line (the report lists how many lines).

    python .ci/device_coverage.py [--fail-under PERCENT] [--skip-tests] [-- PYTEST ARGS]
"""

import argparse
import filecmp
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "coverage"
COPY = WORK / "src"
REPORT = WORK / "report.txt"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def include_closure(root: Path) -> list[str]:
    """The .cu files under csrc/ and every csrc header they include, transitively: paths
    relative to root. Includes resolve against the including file's folder, then csrc/."""
    csrc = root / "csrc"
    todo = sorted(csrc.rglob("*.cu"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in INCLUDE.findall(path.read_text()):
            for base in (path.parent, csrc):
                candidate = (base / name).resolve()
                if candidate.is_file():
                    todo.append(candidate)
                    break
    return sorted(str(p.relative_to(root)) for p in seen)


def cuda_only(path: str) -> bool:
    name = Path(path).name
    return name.endswith(".cu") or (name.startswith("cuda_") and name.endswith(".cuh"))


def code_lines(text: str) -> list[int]:
    """Line numbers that hold code: not blank, not a comment, not a preprocessor line, not a
    lone brace (how the CUDA-only files are counted, having no gcov records)."""
    lines, in_comment = [], False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if in_comment:
            in_comment = "*/" not in stripped
            continue
        if stripped.startswith("/*"):
            in_comment = "*/" not in stripped
            continue
        if not stripped or stripped.startswith(("//", "#")) or stripped in ("{", "}", "};"):
            continue
        lines.append(number)
    return lines


def macro_argument_lines(text: str) -> set[int]:
    """Lines inside the arguments of an AT_DISPATCH_* macro (after the macro's own line): GCC
    gives all code in a macro's arguments the line of the macro, so gcov counts such a dispatch
    body, lambda and all, as that one line."""
    lines: set[int] = set()
    for match in re.finditer(r"\bAT_DISPATCH_\w+\s*\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        first = text.count("\n", 0, match.start()) + 1
        last = text.count("\n", 0, end) + 1
        lines.update(range(first + 1, last + 1))
    return lines


def sync_copy() -> None:
    """COPY mirrors the checkout's tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    wanted = {name for name in listed if name and (ROOT / name).is_file()}
    for name in sorted(wanted):
        src, dst = ROOT / name, COPY / name
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for top in ("csrc", "kernels", "mobilenet", "bench", "tests"):
        for path in (COPY / top).rglob("*"):
            name = str(path.relative_to(COPY))
            stale = path.suffix in (".py", ".h", ".cuh", ".cu", ".cpp") and name not in wanted
            if path.is_file() and stale:
                path.unlink()


def build(env: dict) -> None:
    subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=COPY,
        env={**env, "DEPSEP_COVERAGE": "1", "DEPSEP_SKIP_CUDA_BUILD": "1"},
        check=True,
    )


def object_files() -> list[Path]:
    return sorted((COPY / "build").rglob("*.o"))


# At -O0 GCC forms no FMA in the AVX2 CPU loops (not device code), whose float32 rounding then
# falls outside the slack of the tests that hold the native CPU backend to oneDNN's accuracy on
# whole networks; they pass in the normal -O3 build.
DEFAULT_PYTEST = [
    "tests",
    "-q",
    "-k",
    "not test_train_example and not test_network_float32_step_as_accurate",
]


def run_tests(env: dict, pytest_args: list[str]) -> int:
    for data in (COPY / "build").rglob("*.gcda"):
        data.unlink()
    env = {**env, "PYTHONPATH": str(COPY), "DEPSEP_SKIP_CUDA_BUILD": "1"}
    command = [sys.executable, "-m", "pytest", *(pytest_args or DEFAULT_PYTEST)]
    return subprocess.run(command, cwd=COPY, env=env).returncode


def gcov_lines(objects: list[Path]) -> dict[str, dict[int, int]]:
    """source path relative to COPY -> {line: count}, summed over every object file."""
    counts: dict[str, dict[int, int]] = {}
    out_dir = WORK / "gcov"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for obj in objects:
        if not obj.with_suffix(".gcda").exists():
            continue  # no test loaded it; its lines stay unexecuted through gcno-less absence
        subprocess.run(
            ["gcov", "--json-format", "--object-directory", str(obj.parent), str(obj)],
            cwd=out_dir,
            check=True,
            capture_output=True,
        )
    for record_file in out_dir.glob("*.gcov.json.gz"):
        record = json.loads(gzip.decompress(record_file.read_bytes()))
        base = Path(record["current_working_directory"])
        for entry in record["files"]:
            path = (base / entry["file"]).resolve()
            try:
                name = str(path.relative_to(COPY.resolve()))
            except ValueError:
                continue  # torch's and the system's headers
            lines = counts.setdefault(name, {})
            for line in entry["lines"]:
                number = line["line_number"]
                lines[number] = lines.get(number, 0) + line["count"]
    return counts


def ranges(numbers: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def report(counts: dict[str, dict[int, int]], files: list[str]) -> tuple[str, float]:
    out = []
    host_hit = host_total = cuda_total = 0
    out.append("Device code (the .cu files and the csrc headers they include):")
    out.append(f"{'file':48} {'executed':>9} {'lines':>6} {'%':>7}")
    missing = []
    for name in files:
        if cuda_only(name):
            continue
        lines = counts.get(name, {})
        hit = sum(1 for c in lines.values() if c > 0)
        total = len(lines)
        host_hit, host_total = host_hit + hit, host_total + total
        if total:
            out.append(f"{name:48} {hit:9d} {total:6d} {100.0 * hit / total:6.1f}%")
        else:
            out.append(f"{name:48} {'-':>9} {0:6d}   (declarations only)")
        unexecuted = sorted(n for n, c in lines.items() if c == 0)
        if unexecuted:
            missing.append(f"  {name}: {ranges(unexecuted)}")
    host_percent = 100.0 * host_hit / host_total if host_total else 100.0
    out.append("Executable lines the CPU tests never execute:")
    out += missing or ["  none"]
    folded = []
    for name in files:
        if not cuda_only(name):
            text = (ROOT / name).read_text()
            n = len(macro_argument_lines(text) & set(code_lines(text)))
            if n:
                folded.append(f"  {name:46} {n:6d} lines")
    if folded:
        out.append("Code lines in AT_DISPATCH macro arguments, which gcov counts as the macro's")
        out.append("line (executed when any of that body ran):")
        out += folded
    out.append("CUDA-only (no host build; code lines counted from the source):")
    for name in files:
        if cuda_only(name):
            n = len(code_lines((ROOT / name).read_text()))
            cuda_total += n
            out.append(f"  {name:46} {n:6d} lines")
    all_percent = 100.0 * host_hit / (host_total + cuda_total) if host_total else 0.0
    out.append(
        f"Device code executed by CPU tests: {host_percent:.1f}% "
        f"({host_hit} of {host_total} host-compiled lines)"
    )
    out.append(
        f"All device code, CUDA-only lines included: {all_percent:.1f}% "
        f"({host_hit} of {host_total + cuda_total})"
    )
    return "\n".join(out), host_percent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fail-under", type=float, help="exit 1 below this host figure")
    parser.add_argument("--skip-tests", action="store_true", help="report the last run's data")
    args = parser.parse_args(own)
    if shutil.which("gcov") is None:
        sys.exit("device_coverage: gcov not found (it comes with gcc)")
    env = dict(os.environ)
    files = include_closure(ROOT)
    status = 0
    if not args.skip_tests:
        sync_copy()
        build(env)
        status = run_tests(env, pytest_args)
    text, percent = report(gcov_lines(object_files()), files)
    if status != 0:
        text += f"\npytest exited with status {status}: a failed test counts what it executed."
    WORK.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text + "\n")
    print(text)
    print(f"(written to {REPORT.relative_to(ROOT)})")
    if status != 0:
        return status
    if args.fail_under is not None and percent < args.fail_under:
        print(f"device code coverage {percent:.1f}% is below {args.fail_under}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
