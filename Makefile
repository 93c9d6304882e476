# skiptune: `make demo` and `make test` are the whole set-up on a machine with
# Python 3.11 and g++; both create .venv/ on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2
BOARD  ?= ulx3s-85f

.PHONY: setup demo test test-fast models accuracy-table bench bench-gemm bitstream flash clean help

help:
	@echo "make setup           create .venv/ and install skiptune with everything the tests need"
	@echo "make demo            fine-tune digits (rotate:30) on the simulated board (rtl device), check it against the model"
	@echo "make test            run the test suite ($(JOBS) workers)"
	@echo "make models          retrain the shipped base models (deterministic)"
	@echo "make accuracy-table  rewrite docs/accuracy.md"
	@echo "make bench           digits and fan: simulated board (cache on, off) against this CPU -> build/bench/"
	@echo "make bench-gemm      systolic array and conv unit cycles -> build/bench/gemm.json"
	@echo "make bitstream       build the bitstream of BOARD (default ulx3s-85f) -> build/BOARD/"
	@echo "make flash           load build/BOARD/skiptune.bit into the board's SRAM (openFPGALoader)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "skiptune needs Python >= 3.11"' \
		|| { echo "error: $(PYTHON) is older than 3.11; run make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	@mkdir -p build/demo
	$(VENV)/bin/skiptune finetune --device rtl --workload digits --drift rotate:30 --json build/demo/rtl.json
	@$(VENV)/bin/skiptune finetune --device model --workload digits --drift rotate:30 --quiet --json build/demo/model.json > /dev/null
	@$(PY) scripts/compare_runs.py build/demo/rtl.json build/demo/model.json

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q

test-fast: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q -m "not slow"

models: $(STAMP)
	$(PY) scripts/pretrain.py digits
	$(PY) scripts/pretrain.py fan

accuracy-table: $(STAMP)
	$(PY) scripts/accuracy_table.py > docs/accuracy.md

bench: $(STAMP)
	$(VENV)/bin/skiptune bench

bench-gemm: $(STAMP)
	$(PY) scripts/bench_gemm.py

bitstream: $(STAMP)
	$(VENV)/bin/skiptune build --board $(BOARD)

flash: $(STAMP)
	$(VENV)/bin/skiptune flash --board $(BOARD)

clean:
	rm -rf build .pytest_cache
