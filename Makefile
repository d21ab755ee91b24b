# tokenrelay — the two commands a fresh machine needs:
#   make demo   install, then watch a stream survive a dropped connection
#   make test   install, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo serve test lint typecheck proto bench chaos chat clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenrelay demo

serve: $(STAMP)
	$(BIN)/tokenrelay serve

chat: $(STAMP)
	$(BIN)/tokenrelay chat "Tell me how tokenrelay keeps a stream alive" --meta sim.pace_ms=20

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy --strict over the server, dev tools and client packages ([tool.mypy]
# in pyproject.toml); any error fails the build.
typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest

proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

bench: $(STAMP)
	$(BIN)/python bench/relay_vs_echo.py

chaos: $(STAMP)
	$(BIN)/tokenrelay chaos --runs 1000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
