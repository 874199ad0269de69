# One command sets everything up and runs the main job (make demo), one sets
# everything up and runs the tests (make test). Both are safe to run again.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean bpf cni

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# the eBPF program, compiled with clang into build/bpf/ (named by the source's hash)
bpf: $(STAMP)
	$(PY) -m stockade.datapath.ebpf build

# the thin CNI plugin (cni/stockade-cni.c): the agent runs each invocation, and the
# venv's Python plugin takes over whenever the agent cannot
cni: build/cni/stockade-cni

build/cni/stockade-cni: cni/stockade-cni.c
	mkdir -p build/cni
	gcc -O2 -Wall -Wextra -Werror -o $@ \
	  -DSTOCKADE_CNI_PYTHON='"$(abspath $(VENV))/bin/stockade-cni"' $<

# The slowest tests are listed so the CI budget (45 minutes) stays in view.
test: $(STAMP) lint bpf cni
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=60

# Every benchmark at report size (about half an hour here), written to docs/benchmarks.md.
bench: $(STAMP)
	$(VENV)/bin/pip install -q -e ".[dev,bench]"
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) build src/*.egg-info
