# metertwin — developer entry points. `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ZONE ?= edge

.PHONY: setup demo test bench lint deploy secrets compare clean

## setup: idempotent; apt-installs redis-server and mosquitto when missing, builds the venv.
setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml dashboard/package-lock.json gateway/swagger-ui/package-lock.json
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v mosquitto >/dev/null || missing="$$missing mosquitto"; \
	command -v mosquitto_ctrl >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v kustomize >/dev/null || ! apt-cache show kustomize >/dev/null 2>&1 || missing="$$missing kustomize"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	@# The dashboard's front-end libraries (pinned in package-lock.json), served by metertwin.stream.
	npm ci --prefix dashboard --no-audit --no-fund --silent
	@# The gateways' /docs assets (swagger-ui-dist; --ignore-scripts: its dependency's install script only reports usage).
	npm ci --prefix gateway/swagger-ui --ignore-scripts --no-audit --no-fund --silent
	touch $(STAMP)

demo: setup
	$(BIN)/python -m embedded.demo $(ARGS)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy metertwin gateway storage meter_sim loadtest embedded dr_bridge metertwin_upgrade
	@# Every handler is a module named `handler`: check them one at a time.
	@# (a failing handler fails the target: the loop used to end in `|| true`)
	@fail=0; for f in functions/*/handler.py; do \
		out=$$($(BIN)/mypy "$$f") || { echo "$$out"; fail=1; }; \
	done; exit $$fail

bench: setup
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk; }
	$(BIN)/python -m loadtest.bench $(ARGS)

compare: setup
	$(BIN)/python -m loadtest.compare $(ARGS)

## secrets: random values for every secret ZONE's functions and infrastructure need, written to
## deploy/k8s/$(ZONE)/.secrets/ (mode 0600, git-ignored, never printed). Standard library only.
secrets:
	@case "$(ZONE)" in edge|fog|cloud) ;; *) echo "ZONE must be edge, fog or cloud (got '$(ZONE)')"; exit 2;; esac
	$(PY) deploy/make_secrets.py --zone $(ZONE)

## deploy: one zone (ZONE=edge|fog|cloud): its infrastructure with kubectl (kustomize overlay
## deploy/k8s/$(ZONE), after `make secrets`), then its functions with faas-cli to $$OPENFAAS_URL.
## See docs/deploy.md.
deploy:
	@case "$(ZONE)" in edge|fog|cloud) ;; *) echo "ZONE must be edge, fog or cloud (got '$(ZONE)')"; exit 2;; esac
	@command -v faas-cli >/dev/null || { echo "faas-cli is not installed: curl -sSL https://cli.openfaas.com | sudo sh   (or: arkade get faas-cli)"; exit 2; }
	@command -v kubectl >/dev/null || { echo "kubectl is not installed: https://kubernetes.io/docs/tasks/tools/   (or: arkade get kubectl)"; exit 2; }
	@test -d deploy/k8s/$(ZONE)/.secrets || { echo "no secrets for zone $(ZONE) yet: run make secrets ZONE=$(ZONE) first"; exit 2; }
	kubectl apply -k deploy/k8s/$(ZONE)
	faas-cli template store pull python3-http
	faas-cli up -f stack.yml --regex '^$(ZONE)-'

clean:
	rm -rf $(VENV) build template .pytest_cache .mypy_cache .ruff_cache
