# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DB ?= $(CURDIR)/instance/demo.sqlite
export FLASK_APP := example_app:create_app

.PHONY: demo test docs bench install clean wheel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . --group dev
	touch $(STAMP)

install: $(STAMP)

# Without OPENAI_API_KEY / ANTHROPIC_API_KEY the app answers chats from example_app/model_server.py,
# started on a thread on a free 127.0.0.1 port at the first chat; it stops with `flask run`.
demo: $(STAMP)
	mkdir -p instance
	EXAMPLE_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/flask ai-metering db upgrade
	EXAMPLE_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/flask seed-demo
	EXAMPLE_DATABASE_URL=sqlite:///$(DEMO_DB) $(BIN)/flask run --port $${PORT:-5000}

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The documentation site, warnings as errors; needs no network (no intersphinx).
docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python -m bench

wheel: $(STAMP)
	$(BIN)/python -m build --wheel --outdir dist .

clean:
	rm -rf $(VENV) dist build instance .pytest_cache docs/_build
