# tokenrelay — the two commands a fresh machine needs:
#   make demo   install, then watch a stream survive a dropped connection
#   make test   install, then lint, type-check and run the whole test suite (Python and Node)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_DIR   := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: demo serve test lint typecheck proto bench chaos chat clean system-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The Node client (clients/node): its dependencies from the committed
# package-lock.json. No Node or npm (or a Node older than 20) is an error,
# never a skip: its tests are part of `make test`.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v node >/dev/null 2>&1 || { echo "make: node not found: the Node client needs Node 20+ and npm" >&2; exit 1; }
	@command -v npm >/dev/null 2>&1 || { echo "make: npm not found: the Node client needs Node 20+ and npm" >&2; exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || { echo "make: node $$(node --version) is too old: the Node client needs Node 20+" >&2; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $@

# Tools the tests run that are not Python packages, from Debian's packages:
# promtool and the Prometheus server (deploy/prometheus: the alert rule tests
# and a real Prometheus firing an alert) and tmux (`tokenrelay top` on a real
# terminal). Installed only when missing; when they cannot be installed the
# run stops here, loudly (the tests would fail without them, never skip).
SYSTEM_TOOLS := promtool=prometheus prometheus=prometheus tmux=tmux

system-tools:
	@missing=""; \
	for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%=*} >/dev/null 2>&1 || missing="$$missing $${pair##*=}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  echo "make: installing Debian packages:$$missing"; \
	  { $$sudo apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; } \
	  || { echo "make: error: could not install$$missing; install it (Debian: apt-get install$$missing), then run make test again" >&2; exit 1; }; \
	  for pair in $(SYSTEM_TOOLS); do \
	    command -v $${pair%%=*} >/dev/null 2>&1 \
	    || { echo "make: error: $${pair%%=*} is still missing after installing $${pair##*=}" >&2; exit 1; }; \
	  done; \
	fi

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

test: $(STAMP) $(NODE_STAMP) system-tools lint typecheck
	$(BIN)/pytest
	cd $(NODE_DIR) && TOKENRELAY_BIN=$(abspath $(BIN))/tokenrelay npm test

proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

bench: $(STAMP)
	$(BIN)/python bench/relay_vs_echo.py

chaos: $(STAMP)
	$(BIN)/tokenrelay chaos --runs 1000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
	rm -rf $(NODE_DIR)/node_modules $(NODE_DIR)/dist $(NODE_DIR)/proto $(NODE_DIR)/src/generated
