# labkit — `make help` lists the targets. `make test` and `make figures` build .venv when it is missing.
PY      := .venv/bin/python
PRESET  ?= mini
JOBS    ?= 2
NB      ?=
SWEEP_NB     ?= 03_vae_crop_vs_full
SWEEP_PARAMS ?= --param seed=0,1,2
export MPLBACKEND := Agg
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
STRIP_KEYS := metadata.language_info metadata.widgets

.DEFAULT_GOAL := help
.PHONY: help venv test test-fast lint figures mini lab test-browser sweep bench gpu-check strip clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'

.venv/.done: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --prefix .venv --name python3 --display-name "labkit (.venv)" >/dev/null
	touch $@

venv: .venv/.done  ## create .venv (torch pinned first, then labkit in editable mode)

test: .venv/.done lint  ## lint, then the test suite (tiny preset; notebooks through papermill), JOBS workers of one thread
	$(PY) -m pytest tests $(if $(filter-out 1,$(JOBS)),-n $(JOBS),)

lint: .venv/.done  ## ruff (configured in pyproject.toml) over labkit, tests, bench
	.venv/bin/ruff check labkit tests bench
	.venv/bin/ruff format --check labkit tests bench

test-fast: .venv/.done  ## unit tests only (no notebooks)
	$(PY) -m pytest tests -m "not slow"

figures: .venv/.done  ## run every notebook on $(PRESET) (default mini) -> figures/<stem>/, JOBS at a time (one thread each)
	$(PY) -m labkit.sweep figures --preset $(PRESET) --jobs $(JOBS) $(if $(NB),--only $(NB),)

mini: .venv/.done  ## retrain the mini backbone (VAE + editor) from scratch on CPU -> labkit/weights/mini
	$(PY) -m labkit.train mini --fresh

lab: .venv/.done  ## JupyterLab on the venv kernel (root too); it prints the URL with its token
	@.venv/bin/nbstripout --install --attributes .git/info/attributes 2>/dev/null && git config filter.nbstripout.extrakeys "$(STRIP_KEYS)" || true
	.venv/bin/jupyter lab notebooks --no-browser --ServerApp.ip=127.0.0.1 $(LAB_ARGS) $(if $(filter 0,$(shell id -u)),--allow-root,)

test-browser: .venv/.done  ## opt-in: JupyterLab in headless Chromium: 00_tour, 01 (moves a slider), 07 studio (draws, runs, saves) on tiny (needs chromium)
	@command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install -y chromium"; exit 1; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt playwright
	LABKIT_BROWSER=1 $(PY) -m pytest tests/browser -p no:cacheprovider -q

sweep: .venv/.done  ## papermill sweep: SWEEP_NB over SWEEP_PARAMS (name=v1,v2 ...) -> figures/sweep/<nb>/table.csv
	$(PY) -m labkit.sweep grid $(SWEEP_NB) --preset $(PRESET) $(SWEEP_PARAMS)

bench: .venv/.done  ## ratio benchmarks (printed side by side)
	for f in bench/*.py; do $(PY) $$f || exit 1; done

gpu-check: .venv/.done  ## on one CUDA GPU (<= 10 min): sampling and a LoRA step, labkit vs plain diffusers/peft, peak memory, MFU (FOLDER=pipeline folder for real weights); without CUDA it says so and exits 0
	$(PY) bench/gpu_check.py $(if $(FOLDER),--folder $(FOLDER),) --out runs/gpu_check.json

strip:  ## strip notebook outputs as the git filter does (keeps tags and kernelspec), so a run leaves git clean
	.venv/bin/nbstripout --extra-keys "$(STRIP_KEYS)" notebooks/*.ipynb

clean:  ## remove caches (keeps .venv and committed figures)
	rm -rf .cache .pytest_cache
