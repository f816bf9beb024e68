# Two entry points for a fresh clone: `make demo` (main job on the default model) and `make test`.
# Both create .venv with Python 3.11 on first use; onnxruntime comes from the `cpu` extra (never also -rocm).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_MODEL ?= demo/tiny
DEMO_ARTIFACT ?= demo/tiny-onnx
PROMPT ?= def fibonacci(n):

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first and exact: a looser spec would pull a multi-GB CUDA build instead of the 2.13.0 CPU wheel.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/zaya-export init --preset tiny --seed 0 --force $(DEMO_MODEL)

# The main job: export the model to an ONNX artifact, generate with onnxruntime (AR and TiDAR), validate against
# the source, and print speed figures.
demo: $(STAMP) $(DEMO_MODEL)/config.json
	$(VENV)/bin/zaya-export export $(DEMO_MODEL) -o $(DEMO_ARTIFACT) --force
	$(VENV)/bin/zaya-export run $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-new-tokens 32
	$(VENV)/bin/zaya-export validate $(DEMO_ARTIFACT)
	$(VENV)/bin/zaya-export run $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-new-tokens 32 --mode tidar-fused
	$(VENV)/bin/zaya-export bench $(DEMO_ARTIFACT) --new-tokens 64 --repeats 2
	$(VENV)/bin/zaya-export bench $(DEMO_ARTIFACT) --new-tokens 64 --repeats 1 --modes ar,tidar,tidar-fused

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) demo
