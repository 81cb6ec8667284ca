# Two-command quick start: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-full bench lint format mini clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU build of 2.13.0; an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the mini world, one step per line so each is a command you can rerun alone.
DEMO_RUN ?= demo-L1
DEMO_HEAD ?= demo-H1
demo: $(STAMP)
	$(BIN)/python -m cross_modal_sd.world.build
	$(BIN)/python -m cross_modal_sd.extract
	$(BIN)/python train.py run_name=$(DEMO_RUN)
	$(BIN)/python train.py experiment=head run_name=$(DEMO_HEAD)
	$(BIN)/python evaluate.py ckpt=checkpoints/$(DEMO_RUN)/best_model.pt head_ckpt=checkpoints/$(DEMO_HEAD)/best_model.pt

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-full: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

# Speedups across cost regimes and deployments, measured and predicted (an idle machine; ~11 min
# with the exports in place, longer when the regime worlds and their exports are built first).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_regimes.py --models mini mini_p30 mini_p15 --repeats 3

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

mini: $(STAMP)
	$(BIN)/python -m cross_modal_sd.world.build

clean:
	rm -rf checkpoints/mini outputs multirun
