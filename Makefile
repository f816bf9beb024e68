# Two entry points for a fresh clone: `make demo` (main job on the default model) and `make test`.
# Both create .venv with Python 3.11 on first use; onnxruntime comes from the `cpu` extra (never also -rocm).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_MODEL ?= models/zaya1-demo
DEMO_ARTIFACT ?= demo/zaya1-demo
PROMPT ?= def read_config(path):
ZX := $(VENV)/bin/zaya-export

.PHONY: demo test install clean train-demo

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

# The main job, on the shipped demo checkpoint (a small ZAYA1 trained with the TiDAR objective): export to ONNX and
# MLIR (compiled by IREE for the CPU), generate with TiDAR and with AR, validate eager <-> ORT <-> IREE, and print
# tokens per forward and the speedups; then the cost curve of every entry (demo/entries.png) and a run with
# --mode auto, the mode the cost model predicts fastest on this machine.
demo: $(STAMP)
	$(ZX) export $(DEMO_MODEL) -o $(DEMO_ARTIFACT) --format onnx,mlir --target cpu --max-batch 1 --block-len auto --levels auto --force
	$(ZX) run $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-new-tokens 96 --mode tidar-fused --sampler greedy
	$(ZX) run $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-new-tokens 96 --mode ar --backend iree
	$(ZX) validate $(DEMO_ARTIFACT) --backend ort,iree
	$(ZX) bench $(DEMO_ARTIFACT) --backend torch,ort,iree --modes ar,tidar,tidar-fused --prompt-len 64 --new-tokens 128 --repeats 2
	$(ZX) bench $(DEMO_ARTIFACT) --backend ort,iree --entries --prompt-len 64 --plot demo/entries.png
	$(ZX) run $(DEMO_ARTIFACT) --prompt '$(PROMPT)' --max-new-tokens 96 --sampler greedy

# Re-train the demo checkpoint from scratch (stage 1 about an hour on 2 CPU cores, stage 2 three self-distillation
# rounds of ~10-17 min each, a second pass of one round on the distilled model, and a third of one round held to the
# stage-1 model with half of each batch real text) and re-measure its model card.
STAGE1 ?= build/zaya1-demo-stage1
train-demo: $(STAMP)
	$(ZX) train-demo $(DEMO_MODEL) --steps 2400 --stop-after 1673 --seed 0
	rm -rf $(STAGE1) && mkdir -p $(dir $(STAGE1)) && mv $(DEMO_MODEL)/distill/stage1 $(STAGE1)
	rm -rf $(DEMO_MODEL)/distill
	$(ZX) train-demo $(DEMO_MODEL) --stage distill --distill-rounds 1
	rm -rf $(DEMO_MODEL)/distill
	$(ZX) train-demo $(DEMO_MODEL) --stage distill --distill-rounds 1 --teacher $(STAGE1) --real-rows 8

# Two workers (this machine kind has 2 cores), whole files per worker so module fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) demo
