# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv (via launch/setup_env.sh) when it is absent.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean-venv

$(VENV)/.installed: pyproject.toml launch/setup_env.sh
	bash launch/setup_env.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

# --resume auto: a second `make demo` continues (or reports complete) runs/demo instead of
# refusing to start over its checkpoints.
demo: setup
	$(PY) launch/pretrain.py --config configs/demo.yaml --resume auto

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/throughput.py --preset cpu --overwrite  # regenerates the committed result
	$(PY) benchmarks/report.py

clean-venv:
	rm -rf $(VENV)
