# make test       set up .venv (first run only), build kernels._C, run the test suite
# make bench      same set-up, then the default benchmark (CPU comparison without a GPU)
# make gpu-check  on a GPU machine: this machine's own torch, nothing installed from the
#                 network; build, the whole suite on the GPU, then the GPU benchmarks
# make build      (re)build kernels._C when csrc/ or setup.py changed

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP_ENV := $(VENV)/.depsep-installed
STAMP_BLD := $(VENV)/.depsep-built
SOURCES   := $(shell find csrc -type f) setup.py
REQS      := requirements-dev.txt
RESULTS   := bench/results/$(shell date +%Y-%m-%d)-gpu
# gpu-check must finish within 8 minutes (SPEC §5): its benchmarks start no measurement later
# than this many seconds after make started, leaving time for the last one and the files.
GPU_CHECK_S := 450
START     := $(shell date +%s)

.PHONY: test bench build gpu-check clean

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

# The benchmarks run even when a test fails (their numbers are still wanted); the target
# fails with the tests' status. The folder ends with tests.log, results.csv, summary.md and one
# PNG per op: 8 files.
gpu-check: SHELL := /bin/bash
gpu-check:
	python3 setup.py --quiet build_ext --inplace
	mkdir -p $(RESULTS)
	python3 -m pytest tests -q 2>&1 | tee $(RESULTS)/tests.log; \
	status=$${PIPESTATUS[0]}; \
	python3 -m bench --device cuda --out $(RESULTS) \
		--time-limit $$(( $(GPU_CHECK_S) - $$(date +%s) + $(START) )); \
	exit $$status

clean:
	rm -rf build kernels/*.so $(STAMP_BLD)
