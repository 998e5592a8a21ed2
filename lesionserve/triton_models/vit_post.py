"""Triton python model: the ViT's logits per head and its attention map -> per head softmax
probabilities, the decision at the head's operating threshold (``1/thresholds.json``, from
``vit-evaluate``) and the attention map at each image's size (lesionserve.vit.decision, the
reference's code). Each request is answered on its own (its maps padded to its largest image).
"""
import triton_python_backend_utils as pb_utils

from lesionserve.preprocessing import ERROR_TENSOR, failed_rows
from lesionserve.triton_config import parameter, parse_args_config, version_dir
from lesionserve.triton_models.tensors import read_host
from lesionserve.vit.decision import melanoma_of_batch
from lesionserve.vit.reference import load_thresholds
from lesionserve.vit.spec import get_head, logits_name, map_name


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        self.heads = [get_head(h) for h in parameter(config, "heads").split(",")]
        self.map = map_name(parameter(config, "map"))
        path = version_dir(args) / "thresholds.json"
        if not path.is_file():
            raise pb_utils.TritonModelException(f"{config['name']}: {path} is missing: assemble the ViT's artifacts "
                                                "(lesionserve assemble ... thresholds.json from vit-evaluate)")
        try:
            self.thresholds = load_thresholds(path, [h.name for h in self.heads])
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{config['name']}: {exc}") from None

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = {h.name: read_host(request, logits_name(h.name)) for h in self.heads}
            out = melanoma_of_batch(logits, self.heads, self.thresholds, read_host(request, self.map),
                                    read_host(request, "image_size"), failed_rows(read_host(request, ERROR_TENSOR)))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
