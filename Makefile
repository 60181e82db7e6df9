# Each target creates the virtual environment when it is missing (or pyproject.toml changed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[export,openvino,serve,embed,tune,audit,shards,dicom,video,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/resfit demo

# Each test file in a fresh interpreter: native libraries (torch's DataLoader workers, gloo,
# OpenVINO) keep process-wide state, and a crash in one file cannot take the rest down.
# Exit status 5 (a file whose tests are all marked slow) is not a failure.
test: $(STAMP)
	@failed=""; for f in tests/test_*.py; do \
		$(BIN)/pytest -q -m "not slow" -p no:cacheprovider $$f; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then failed="$$failed $$f($$rc)"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; echo "all test files passed"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
