# Set-up and the two commands of the README. Each target creates its own virtual environment and
# installs the Fashion-MNIST Debian package when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast dataset venv bench clean reproduce-quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $@

venv: $(VENV)/.installed

dataset:
	@if [ ! -f $(FASHION) ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The main job: a short real Fashion-MNIST run of PD-ASGD beside the synchronous reference,
# D-ASGD and Hogwild, printing the result table, with the default flags (every trainer the same).
demo: venv dataset
	$(VENV)/bin/asyncsgd compare --model mlp --dataset fashion_mnist --epochs 2 \
	  --trainers sync,layerwise,pdasgd,dasgd,hogwild --out runs/demo --overwrite

# Every test, including the slow ones and the real-data ones (which must not be skipped here).
test: venv dataset
	ASYNCSGD_REQUIRE_REALDATA=1 $(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(VENV)/bin/asyncsgd bench --model cnn --batch-size 128 --steps 20 --unit-times --out runs/bench-cnn
	$(VENV)/bin/asyncsgd bench --model mlp --batch-size 128 --steps 200 --out runs/bench-mlp

# Every experiment script's --quick setting, one after another (results in results/<experiment>/).
reproduce-quick: venv dataset
	@for script in experiments/*.py; do \
	  echo "== $$script --quick"; $(PY) $$script --quick --overwrite || exit 1; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache
