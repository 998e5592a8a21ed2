"""Triton python model: the crop step of the ``lesion_crop`` ensemble. Encoded images and the
segmenter's logits -> each image's lesion (the segmentation pipeline's post-processing), its
bounding rectangle grown by the margin cut from the original image (lesionserve.cropping), then the
classifier's preprocessing of the crop: one pixel tensor per member input, as ``preprocess`` makes
for whole images. Also ``box`` (the rectangle classified, original pixels) and ``cropped`` (False:
no lesion was found and the whole image was classified).
"""
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from lesionserve.preprocessing import ERROR_TENSOR, error_column, failed_rows
from lesionserve.segmentation.postprocess import crop_batch
from lesionserve.segmentation.spec import SEGMENTER_OUTPUT
from lesionserve.triton_config import output_preprocessing, parameter, parse_args_config
from lesionserve.triton_models.tensors import read_host

NOT_PIXELS = (ERROR_TENSOR, "box", "cropped")


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        try:
            self.outputs = {o["name"]: output_preprocessing(config, o) for o in config["output"] if o["name"] not in NOT_PIXELS}
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"crop step: {exc}") from None
        self.threshold = float(parameter(config, "threshold"))
        self.margin = float(parameter(config, "margin"))
        self.limits = {"max_pixels": int(parameter(config, "max_pixels")), "max_bytes": int(parameter(config, "max_bytes"))}
        self.pool = ThreadPoolExecutor(int(parameter(config, "decode_threads", "1")), thread_name_prefix="crop")

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            blobs = [bytes(b) for b in read_host(request, "raw_image").reshape(-1)]
            batch, boxes, found = crop_batch(
                blobs, read_host(request, SEGMENTER_OUTPUT), read_host(request, "image_size"),
                failed_rows(read_host(request, "segment_error")), tuple(self.outputs.values()),
                self.threshold, self.margin, map_fn=self.pool.map, **self.limits,
            )
            tensors = [pb_utils.Tensor(name, batch.pixels[spec]) for name, spec in self.outputs.items()]
            tensors += [pb_utils.Tensor(ERROR_TENSOR, error_column(batch.errors)), pb_utils.Tensor("box", boxes),
                        pb_utils.Tensor("cropped", found)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
