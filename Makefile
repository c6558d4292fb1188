# Set-up and everyday commands. Every target creates the virtual environment first if needed.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	# Real aerial photos with tree boxes for the detection demo and tests: the wheel only, read as a
	# zip (deepforest's own dependencies clash with graft's and are not installed).
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps deepforest==2.1.0 -d $(VENV)/share/graft
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/graft demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
