# NVIDIA's TensorRT image (same NGC release as the Triton image: a plan runs only under the TensorRT
# that built it) plus what `python3 -m lesionserve.export.tensorrt` needs besides TensorRT: cuda-python for device
# buffers, ONNX Runtime as the check's reference, numpy<2, OpenCV and tqdm for the synthetic check
# images. No torch: the image has none and the build does not need it.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3
FROM ${TENSORRT_IMAGE}

ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/requirements-engine-builder.txt /tmp/lesionserve/
RUN python3 -m pip install -r /tmp/lesionserve/requirements-engine-builder.txt \
 && python3 -c "import tensorrt, onnxruntime, cv2, numpy; print('TensorRT', tensorrt.__version__)"

WORKDIR /opt/lesionserve
COPY lesionserve lesionserve
ENV PYTHONPATH=/opt/lesionserve
CMD ["python3", "-m", "lesionserve.export.tensorrt", "--help"]
