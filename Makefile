# make test       set up .venv (first run only), build kernels._C, run the test suite
# make bench      same set-up, then the default benchmark (CPU comparison without a GPU)
# make gpu-check  on a GPU machine: this machine's own torch, nothing installed from the
#                 network; build, the GPU tests, compute-sanitizer, then the GPU benchmarks
# make coverage   the lines of the device code that the CPU tests execute (gcov)
# make build      (re)build kernels._C when csrc/ or setup.py changed

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP_ENV := $(VENV)/.depsep-installed
STAMP_BLD := $(VENV)/.depsep-built
SOURCES   := $(shell find csrc -type f) setup.py
REQS      := requirements-dev.txt

.PHONY: test bench build gpu-check coverage clean

test: $(STAMP_BLD)
	$(PY) -m pytest tests

bench: $(STAMP_BLD)
	$(PY) -m bench

build: $(STAMP_BLD)

$(STAMP_ENV): $(REQS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(REQS)
	# The checkout itself on the venv's path, so `python -m bench` and `import kernels` work
	# from anywhere without copying the built extension around.
	echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/depsep-kernels.pth
	touch $@

$(STAMP_BLD): $(STAMP_ENV) $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

# .ci/gpu_check.py: build for this GPU, its tests (the benchmarks run even when one fails; the
# target fails with the tests' status), compute-sanitizer, then the benchmarks, within 8 minutes,
# into bench/results/<date>-gpu (at most 8 files). `python3 .ci/gpu_check.py --dry` on any machine.
gpu-check:
	python3 .ci/gpu_check.py

# Which lines of the device code (what nvcc compiles) the CPU tests execute: a gcov build in
# build/coverage, the test suite there, the report in build/coverage/report.txt.
coverage: $(STAMP_ENV)
	$(PY) .ci/device_coverage.py --fail-under 95

clean:
	rm -rf build kernels/*.so $(STAMP_BLD)
