# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the project once; a second run installs nothing
# (the stamp below is newer than pyproject.toml and constraints.txt) and starts within seconds.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.coach-installed
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: install test demo protos bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/coach demo

# Regenerate protos/coach/v1/*_pb2*.py from the .proto (the generated files are committed;
# tests/test_protos_fresh.py fails when they are stale).
protos: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/coach/v1/coach.proto

bench: install
	$(VENV)/bin/coach bench codec

clean:
	rm -rf $(VENV) build *.egg-info
