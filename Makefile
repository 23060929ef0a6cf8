# Two commands do everything on a fresh machine: `make train` and `make test`.
# Both create .venv with the pinned stack first when it is missing (tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/quickstart.yaml
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
export PYTHONUNBUFFERED := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: env train test test-slow bench clean

env: $(VENV)/.solar-env-complete
$(VENV)/.solar-env-complete: tools/setup_env.sh setup.cfg
	bash tools/setup_env.sh

train: env
	$(VENV)/bin/solar train $(CONFIG) $(ARGS)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: env
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: env
	$(VENV)/bin/solar bench attention --n 1000 2000 5000 10000 20000 --m 0 1000 4000 --rank 8 16 32 --json out/bench_attention.json --plot out/bench_attention.png

clean:
	rm -rf runs out .pytest_cache
