# NVIDIA's Triton image plus what LesionServe's python models import. The stub runs the image's own
# python3, so the packages go into it: numpy<2 (Triton's python stub returns empty tensors with numpy
# 2), OpenCV (decoding), Pillow (header checks before decoding) and ONNX Runtime (the CPU variant's
# backbones); with WITH_TORCH=1 also torch (the GPU variants' python steps work on CUDA tensors) and
# timm (gpu_torch rebuilds the backbones from their checkpoints). The `lesionserve` package is
# copied in; model_repository/ is a volume.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

ARG WITH_TORCH=1
# Newer NGC images (Ubuntu 24.04) mark the system python as externally managed; this image is ours.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*

COPY deploy/requirements-triton.txt deploy/requirements-triton-torch.txt /tmp/lesionserve/
RUN python3 -m pip install -r /tmp/lesionserve/requirements-triton.txt \
 && if [ "$WITH_TORCH" = "1" ]; then python3 -m pip install -r /tmp/lesionserve/requirements-triton-torch.txt; fi \
 && python3 -c "import numpy, cv2, onnxruntime, PIL; assert numpy.__version__ < '2', numpy.__version__; print('numpy', numpy.__version__, 'opencv', cv2.__version__)" \
 && if [ "$WITH_TORCH" = "1" ]; then python3 -c "import torch, timm; print('torch', torch.__version__)"; fi

COPY lesionserve /opt/lesionserve/lesionserve
ENV PYTHONPATH=/opt/lesionserve
