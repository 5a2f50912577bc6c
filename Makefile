# The two commands: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it; a stamp file re-runs the install when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

$(VENV)/.installed-lint: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	@touch $@

demo: $(VENV)/.installed
	$(BIN)/coap-ws-gateway demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check translator tests bench
	$(BIN)/mypy translator

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Coverage-guided fuzzing of the frame parser, codecs, URIs and policy (fuzz/fuzz_frames.py).
# Bounded: FUZZ_SECONDS (default 60). The growing corpus lives in .venv/fuzz-corpus; inputs
# that crash are written to fuzz/crashes/ (replay: $(BIN)/python fuzz/fuzz_frames.py FILE).
FUZZ_SECONDS ?= 60

$(VENV)/.installed-fuzz: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	@touch $@

.PHONY: fuzz
fuzz: $(VENV)/.installed-fuzz
	@mkdir -p $(VENV)/fuzz-corpus/frames fuzz/crashes
	$(BIN)/python fuzz/fuzz_frames.py -max_total_time=$(FUZZ_SECONDS) -max_len=16384 \
		-timeout=10 -rss_limit_mb=2048 -artifact_prefix=fuzz/crashes/ \
		$(VENV)/fuzz-corpus/frames fuzz/seeds/frames

# Benchmarks against bare baselines (bench/, docs/performance.md): real processes on loopback,
# about 5 minutes; bench-quick under one minute. Prints the table, writes
# bench/results/latest.json and the chart bench/results/latest.png. BENCH_ARGS: e.g. --large.
BENCH_ARGS ?=

$(VENV)/.installed-bench: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@touch $@

.PHONY: bench-quick
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)
