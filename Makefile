# Two commands for a new user: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv if it is missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default; e.g. `make demo TORCH_SPEC=torch` to let pip choose.
TORCH_SPEC ?= torch==2.13.0
# Local copy of the official dataset files (no download). Defaults to ../shared/data when it exists.
DATA_MIRROR ?= $(wildcard ../shared/data)
WORKDIR ?= runs/demo
DATA_DIR ?= data
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.monai_fedkd-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/monai-fedkd demo --workdir $(WORKDIR) --data-dir $(DATA_DIR) $(if $(DATA_MIRROR),--mirror $(DATA_MIRROR),)

test: $(STAMP)
	DATA_MIRROR="$(DATA_MIRROR)" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(WORKDIR) $(DATA_DIR)
