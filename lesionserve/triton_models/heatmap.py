"""Triton python model: the members' maps of N*T views -> one fused heatmap per image, at its size.

Each image's class is its ``explain_class`` (empty: its predicted ``label``); an unknown class or
method fails the request with a message naming what is allowed. Rows whose image could not be read
get a zero map. The arithmetic is lesionserve.explain's (view_maps, fuse_view_maps), the same the
reference pipeline uses.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.calibration import Calibration
from lesionserve.explain import CAM_METHODS, explanation_classes, fuse_view_maps, view_maps
from lesionserve.preprocessing import ERROR_TENSOR, failed_rows
from lesionserve.triton_config import parameter, parse_args_config, version_dir
from lesionserve.triton_models.tensors import read_host


def _text(column) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(column, dtype=np.object_).reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        self.class_names = parameter(config, "class_names").split(",")
        self.sizes = dict(item.split("=") for item in parameter(config, "member_sizes").split(","))
        self.members = list(self.sizes)
        self.methods = parameter(config, "methods").split(",")
        if self.methods != list(CAM_METHODS):
            raise pb_utils.TritonModelException(f"explain: methods {self.methods} differ from this code's {list(CAM_METHODS)}")
        self.weights = Calibration.load(version_dir(args) / "calibration.json").weight_vector(self.members)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        views = int(read_host(request, "num_views")[0])
        labels, wanted = _text(read_host(request, "label")), _text(read_host(request, "explain_class"))
        methods = set(_text(read_host(request, "explain_method"))) or {CAM_METHODS[0]}
        if len(methods) != 1 or not methods <= set(CAM_METHODS):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"cannot explain: explain_method must be one of {', '.join(CAM_METHODS)}, the same for a whole "
                f"request; got {sorted(methods)}", pb_utils.TritonError.INVALID_ARG))
        try:
            # A row whose image could not be read has no label: any class will do, its map is zeroed below.
            classes = np.array(explanation_classes([c or None for c in wanted],
                                                   [lab or self.class_names[0] for lab in labels], self.class_names))
        except ValueError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        failed = failed_rows(read_host(request, ERROR_TENSOR))
        sizes = [tuple(int(v) for v in s) for s in read_host(request, "image_size").reshape(-1, 2)]
        good = [s for s, f in zip(sizes, failed) if not f]
        if len(set(good)) > 1:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"cannot explain images of different sizes in one request ({sorted(set(good))}): "
                "send one image per request (the SDK does)", pb_utils.TritonError.INVALID_ARG))
        method = CAM_METHODS.index(methods.pop())
        width, height = good[0] if good else (1, 1)  # all rows failed: 1x1 zero maps keep the shapes valid
        per_member = [view_maps(read_host(request, f"cams_{m}")[:, method], classes, views, int(self.sizes[m]))
                      for m in self.members]
        fused, _ = fuse_view_maps(per_member, self.weights, views, [(width, height)] * len(classes))
        heatmap = np.stack(fused).astype(np.float32)
        heatmap[failed] = 0.0
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("heatmap", heatmap)])
