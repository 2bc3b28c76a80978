# metertwin — developer entry points. `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ZONE ?= edge

.PHONY: setup demo test bench lint deploy compare clean

## setup: idempotent; apt-installs redis-server and mosquitto when missing, builds the venv.
setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v mosquitto >/dev/null || missing="$$missing mosquitto"; \
	command -v mosquitto_ctrl >/dev/null || missing="$$missing mosquitto-clients"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/python -m embedded.demo $(ARGS)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy metertwin gateway storage meter_sim loadtest embedded dr_bridge metertwin_upgrade
	@# Every handler is a module named `handler`: check them one at a time.
	@for f in functions/*/handler.py; do $(BIN)/mypy "$$f" | grep -v '^Success' || true; done

bench: setup
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk; }
	$(BIN)/python -m loadtest.bench $(ARGS)

compare: setup
	$(BIN)/python -m loadtest.compare $(ARGS)

## deploy: faas-cli deploy of one zone's functions (ZONE=edge|fog|cloud) to $$OPENFAAS_URL.
deploy:
	@case "$(ZONE)" in edge|fog|cloud) ;; *) echo "ZONE must be edge, fog or cloud (got '$(ZONE)')"; exit 2;; esac
	faas-cli template store pull python3-http
	faas-cli up -f stack.yml --regex '^$(ZONE)-'

clean:
	rm -rf $(VENV) build template .pytest_cache .mypy_cache .ruff_cache
