# make run: create .venv, install, serve MODEL_DIR.   make test: the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= MIT/ast-finetuned-audioset-10-10-0.4593
MODEL_NAME ?= ast

.PHONY: install install-dev peer-venv run test random-model bench docs-tables gpu-check gpu-rehearsal gpu-device-like gpu-wheels timeline pack-model load soak fuzz fuzz-api image image-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The optimum-intel peer make bench compares against, in a virtualenv of its own.
PEER_VENV ?= .peer-venv
$(PEER_VENV)/.installed: benchmarks/requirements-peer.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q -r benchmarks/requirements-peer.txt
	# optimum pulls a torchvision built for another torch (its import fails); audio needs none of it.
	$(PEER_VENV)/bin/python -m pip uninstall -q -y torchvision
	touch $@
peer-venv: $(PEER_VENV)/.installed

run: install
	AST_MODEL_DIR=$(MODEL_DIR) AST_MODEL_NAME=$(MODEL_NAME) $(BIN)/python -m predictor

# The suite in two runs: the checks that bound no latency and no memory peak, spread over every core
# (pytest-xdist: each worker has its own session, models and ONNX cache; one per core, at most 4, each worker's
# servers taking a GiB or two); then the ones marked serial, alone, so that no other test's load is in what they
# measure.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$((n < 4 ? n : 4)))
test: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not image and not serial and not rehearsal"
	$(BIN)/python -m pytest -m "serial and not image and not rehearsal"

random-model: install
	$(BIN)/python -m tools.random_ast models/ast-random

bench: install-dev peer-venv
	PEER_PYTHON=$(PEER_VENV)/bin/python $(BIN)/python -m benchmarks.bench

# The GPU path on a machine with an NVIDIA GPU and a CUDA build of torch (tools/gpu_check.py); elsewhere it says
# so and exits 0 (GPU_CHECK_ARGS=--rehearse: the same run on the CPU, short). It runs with this repo's .venv where
# there is one, else with $(PYTHON) and the packages it has.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) -m tools.gpu_check $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(GPU_CHECK_ARGS)
# make gpu-check and the bench's GPU section, rehearsed on the CPU (--rehearse), as tests: .ci/run runs them after
# make test, whose time they would double.
gpu-rehearsal: install-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m rehearsal

# on_device.sh's two runs rehearsed on the CPU in a Python like the GPU machine's: its Python, torch, transformers
# and numpy, with the carried wheels (tools/device_like.sh; a virtualenv of some GB, made once). OUT=DIR keeps the results.
gpu-device-like:
	bash tools/device_like.sh

# The docs' tables of measurements, rewritten from the benchmarks/results/ files their markers name.
docs-tables:
	$(PYTHON) -m tools.docs_tables

timeline: install-dev
	$(BIN)/python -m tools.timeline

# Mixed load (32 users, 60 s, tiny model), then overload at 4x capacity (full-size model): benchmarks/results/load-*.json
load: install-dev
	$(BIN)/python -m benchmarks.load

# 10,000 requests; RSS, open files and threads of the server over the run: benchmarks/results/soak-*.json
soak: install-dev
	$(BIN)/python -m benchmarks.soak

# Coverage-guided fuzzing (atheris) of the decoder and the request parsers; findings in .fuzz/crashes fail it.
FUZZ_SECONDS ?= 120
fuzz: install-dev
	$(BIN)/python -m tools.fuzz_decoder --seconds $(FUZZ_SECONDS)

# The schemathesis and hypothesis tests with many more examples (about 5 minutes on 2 cores).
fuzz-api: install-dev
	SCHEMATHESIS_MAX_EXAMPLES=1000 HYPOTHESIS_EXAMPLES_SCALE=10 $(BIN)/python -m pytest tests/test_openapi.py tests/test_properties.py

# make pack-model SRC=path/or/hub-id OUT=dir [PACK_ARGS="--precisions fp32,int8"]: a model directory, engine files included, ready for a bucket or PVC.
pack-model: install
	$(BIN)/python -m tools.pack_model $(SRC) $(OUT) --tar $(PACK_ARGS)

# The serving image (Docker if an engine answers, else buildah), then the image itself served and stopped as a pod would be.
# make image VARIANT=cuda: the CUDA image for GPU nodes (tagged ast-kserve:dev-cuda unless IMAGE says).
VARIANT ?= cpu
IMAGE ?= $(if $(filter cuda,$(VARIANT)),ast-kserve:dev-cuda,ast-kserve:dev)
image:
	IMAGE=$(IMAGE) VARIANT=$(VARIANT) $(PYTHON) -m tools.image

image-test: install-dev image
	IMAGE=$(IMAGE) VARIANT=$(VARIANT) $(BIN)/python -m pytest -m image tests/image

# The wheels make gpu-check needs on a GPU machine without a network (Python 3.12): into .whl/, to carry there.
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_35_x86_64 \
		-d .whl -r tools/gpu-wheels.txt && du -sh .whl
