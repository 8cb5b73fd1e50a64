# Two commands for a fresh clone: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= test,triton,tokenizers,elastic,ray,hf,megatron,wandb
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2" "setuptools>=68" wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip check
	touch $@

demo: setup
	$(VENV)/bin/dist-train local --nproc 4 configs/tiny.toml --set run.name=tiny-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS),bench]"
	DS_BUILD_OPS=0 $(PY) bench/dp_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
