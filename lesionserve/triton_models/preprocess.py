"""Triton python model: encoded images -> normalised pixel tensors, one per member input (its size
from the output's dims, its statistics from the ``normalize_<output>`` parameter), and each image's decode error (``error``: b"" when decoded; its pixel rows are then zeros).

An unreadable image fails neither the request nor the other images in it: the ensemble carries
its reason to the client in the same response. KIND_CPU (config.pbtxt): numpy on the host.
KIND_GPU (configs/gpu*.pbtxt): decode and resize on the CPU, normalise on the GPU, pixel outputs
stay on the GPU for tta (``error`` is BYTES, always on the host).
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import triton_python_backend_utils as pb_utils

from lesionserve.preprocessing import DEFAULT_MAX_BYTES, ERROR_TENSOR, error_column, preprocess_batch_rows
from lesionserve.triton_config import device_for, output_preprocessing, parameter, parse_args_config
from lesionserve.triton_models.tensors import synchronize, write


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        outputs = {o["name"]: o for o in config["output"]}
        error = outputs.pop(ERROR_TENSOR, None)
        outputs.pop("image_size", None)  # each image's (width, height), written beside the pixels
        if error is None or error.get("data_type") != "TYPE_STRING":
            # Without it a bad image could only fail its whole request: a broken deployment.
            raise pb_utils.TritonModelException(
                f"preprocess: config must declare output {{ name: \"{ERROR_TENSOR}\", data_type: TYPE_STRING, "
                f"dims: [ 1 ] }} (each image's decode error), got {error}"
            )
        # Output name -> (size, normalisation), read from the generated config: declared in one place.
        try:
            self.outputs = {name: output_preprocessing(config, o) for name, o in outputs.items()}
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"preprocess: {exc}") from None
        self.max_pixels = int(parameter(config, "max_pixels"))
        # Default keeps repositories assembled before max_bytes existed loadable.
        self.max_bytes = int(parameter(config, "max_bytes", str(DEFAULT_MAX_BYTES)))
        self.device = device_for(args)
        # Decoding threads: OpenCV releases the GIL, so a request's images decode side by side.
        threads = int(parameter(config, "decode_threads", "1"))
        if threads < 1:
            raise pb_utils.TritonModelException(f"preprocess: decode_threads must be >= 1, got {threads}")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def execute(self, requests):
        responses = []
        inputs = tuple(self.outputs.values())
        for request in requests:
            blobs = pb_utils.get_input_tensor_by_name(request, "raw_image").as_numpy().reshape(-1)
            batch = preprocess_batch_rows(
                [bytes(b) for b in blobs], inputs, self.max_pixels, self.device,
                max_bytes=self.max_bytes, map_fn=self.pool.map,
            )
            tensors = [write(name, batch.pixels[spec]) for name, spec in self.outputs.items()]
            tensors.append(pb_utils.Tensor(ERROR_TENSOR, error_column(batch.errors)))
            tensors.append(pb_utils.Tensor("image_size", np.asarray(batch.image_sizes, dtype=np.int32).reshape(-1, 2)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        synchronize(self.device)
        return responses
