# Quick start targets; see README.md. Each target sets up the virtual environment it needs.
PYTHON ?= python3
CORE_VENV := .venv-core
DEV_VENV := .venv
SCENARIO ?= scenarios/paper/3-node.toml
OUT ?= runs/3-node-sim

.PHONY: simulate test calibration clean-containers

# The main job with the core install only: no torch, no Docker.
$(CORE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install --quiet .
	touch $@

simulate: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/amp4ec simulate $(SCENARIO) --out $(OUT) --force

# Everything the tests need: torch and torchvision on the host, the Docker SDK, pytest.
$(DEV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/pip install --quiet -e '.[torch,docker,dev]'
	touch $@

test: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m pytest -ra

# Regenerates the calibration shipped in amp4ec/data, timings then memory search (needs Docker; each log
# ends with its duration).
calibration: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/amp4ec calibrate --model mobilenet_v2 --granularity block \
		--profile high:1.0:1024 --profile medium:0.6:512 --profile low:0.4:512 --profile double:2.0:2048:2 --profile pair:1.0:1024:2 \
		--repeats 10 --max-repeats 250 --max-turns 24 --warmup 5 --gap-ms 100 --force --out amp4ec/data/calibration-mobilenet_v2.json
	$(DEV_VENV)/bin/amp4ec calibrate memory amp4ec/data/calibration-mobilenet_v2.json --out amp4ec/data/calibration-mobilenet_v2.json --force

clean-containers: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/amp4ec clean
