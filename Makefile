# Two commands set everything up: `make serve` and `make test`. Targets are one-liners; logic lives in scripts/.
PY ?= python3
VENV := .venv
COMPAT := .venv-compat
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install install-test serve test test-gpu test-slow bench bench-density bench-families soak chaos lint image test-container clean

# The torch build this host needs (cpu or cuda); the install stamp is named after it, so a venv moved to a host that
# needs the other build is installed again.
TORCH_BUILD := $(shell PY=$(PY) bash scripts/torch-build.sh)
STAMP := $(VENV)/.installed-torch-$(TORCH_BUILD)

install: $(STAMP)
$(STAMP): pyproject.toml scripts/install.sh scripts/torch-build.sh scripts/torch-cuda.py
	PY=$(PY) SIE_TORCH=$(TORCH_BUILD) bash scripts/install.sh server

install-test: $(VENV)/.installed-test
$(VENV)/.installed-test: $(STAMP) pyproject.toml scripts/install.sh
	PY=$(PY) bash scripts/install.sh test && touch $@

serve:
	bash scripts/serve.sh $(ARGS)

test: install-test
	bash scripts/test.sh $(PYTEST_ARGS)

test-container: install-test
	SIE_CONTAINER_TESTS=1 $(VENV)/bin/python -m pytest tests/container $(PYTEST_ARGS)

test-slow: install-test
	$(VENV)/bin/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: install-test
	$(VENV)/bin/python -m pytest -m gpu $(PYTEST_ARGS)

bench: install-test
	$(VENV)/bin/python bench/run.py $(ARGS)

bench-density: install-test
	$(VENV)/bin/python bench/density.py $(ARGS)

bench-families: install-test
	$(VENV)/bin/python bench/families.py $(ARGS)

soak: install-test
	$(VENV)/bin/python bench/soak.py $(ARGS)

chaos: install-test
	$(VENV)/bin/python bench/chaos.py $(ARGS)

lint: install-test
	$(VENV)/bin/ruff check router worker sdk tests bench

image:
	bash scripts/image.sh $(ARGS)

clean:
	rm -rf $(VENV) $(COMPAT) .cache
