# The README's commands. `make fit` and `make test` install into .venv first when needed (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install fit smoke test test-slow lint bench tensorboard clean

install: $(STAMP)

# Re-install only when the dependency files change; the package itself is editable. The training stack (extra
# `train`) and the test tools (`dev`); a serving-only install is `pip install -c constraints.txt .` (see README).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

fit: install
	$(BIN)/python -m dwcp_lstm fit $(ARGS)

# The smoke fit (about a minute on CPU): two short epochs on 2,000 synthetic rows, every artifact of a real run.
smoke: install
	$(BIN)/python -m dwcp_lstm fit --config configs/smoke.yaml $(ARGS)

# Two worker processes (pytest-xdist), one test file each at a time: module fixtures (a fit) are built once.
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m dwcp_lstm bench $(ARGS)

# Loss curves, learning rate, HPARAMS and the report's figures of every run: http://localhost:$(TB_PORT)
TB_PORT ?= 6006
tensorboard: install
	$(BIN)/tensorboard --logdir lightning_logs --port $(TB_PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
