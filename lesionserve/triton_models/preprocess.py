"""Triton python model: encoded images -> normalised pixel tensors, one per output resolution.

KIND_CPU (config.pbtxt): numpy on the host. KIND_GPU (configs/gpu*.pbtxt): decode and resize on the
CPU, normalise on the GPU, outputs stay on the GPU for tta.
"""
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from lesionserve.preprocessing import DEFAULT_MAX_BYTES, ImageDecodeError, preprocess_batch
from lesionserve.triton_config import device_for, parameter, parse_args_config, square_size
from lesionserve.triton_models.tensors import synchronize, write


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        # Output name -> side length, read from the config so resolutions are declared in one place.
        self.outputs = {o["name"]: square_size(o["dims"]) for o in config["output"]}
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
        sizes = set(self.outputs.values())
        for request in requests:
            blobs = pb_utils.get_input_tensor_by_name(request, "raw_image").as_numpy().reshape(-1)
            try:
                batch = preprocess_batch(
                    [bytes(b) for b in blobs], sizes, self.max_pixels, self.device,
                    max_bytes=self.max_bytes, map_fn=self.pool.map,
                )
            except ImageDecodeError as exc:  # the caller's bad input: fail this request only
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensors = [write(name, batch[size]) for name, size in self.outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        synchronize(self.device)
        return responses
