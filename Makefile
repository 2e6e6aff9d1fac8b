# Set-up and everyday commands. Every target is idempotent: run it again and it does only what is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv test quick fashion-mnist bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian (the data of the `quick` preset); needs root and apt.
fashion-mnist:
	@test -f $(FMNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

test: venv
	$(BIN)/python -m pytest tests

quick: venv fashion-mnist
	$(BIN)/wmse pretrain --preset quick

bench: venv
	$(BIN)/python benchmarks/loss.py --threads 1
	$(BIN)/python benchmarks/augment.py --threads 1
	$(BIN)/python benchmarks/evaluate.py --threads 2
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
