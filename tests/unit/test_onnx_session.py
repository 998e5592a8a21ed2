"""The project's ONNX Runtime session factory and chunked runs, on a tiny generated model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from lesionserve.onnx_session import make_session, run_in_chunks


@pytest.fixture()
def tiny_model(tmp_path):
    # y = x @ W + b: rows are independent, so chunked runs must equal one run exactly.
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [1, -2, 0.5, 3, -1, 4])
    b = helper.make_tensor("B", TensorProto.FLOAT, [2], [0.25, -0.5])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_run_in_chunks_equals_one_run_for_any_chunk(tiny_model, chunk):
    session = make_session(tiny_model, threads=1, spinning=False)
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    whole = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(run_in_chunks(session, x, chunk), whole)


def test_bad_arguments_are_named(tiny_model):
    with pytest.raises(ValueError, match="threads must be >= 0"):
        make_session(tiny_model, threads=-1)
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        run_in_chunks(make_session(tiny_model, threads=1), np.zeros((2, 3), np.float32), 0)


@pytest.fixture()
def two_output_model(tmp_path):
    # y = x @ W (kept), z = relu(x @ V) (a second head, as ``cams`` is beside ``logits``).
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [1, -2, 0.5, 3, -1, 4])
    v = helper.make_tensor("V", TensorProto.FLOAT, [3, 4], list(np.arange(12, dtype=float) - 6))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["x", "V"], ["zv"]),
         helper.make_node("Relu", ["zv"], ["z"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])], [w, v])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    return path


def test_pruned_graph_keeps_only_the_named_outputs_nodes_and_weights(two_output_model):
    from lesionserve.onnx_session import graph_outputs, pruned_graph

    assert graph_outputs(two_output_model) == ["y", "z"]
    pruned = onnx.load_from_string(pruned_graph(two_output_model, ["y"]))
    assert [n.op_type for n in pruned.graph.node] == ["MatMul"] and [i.name for i in pruned.graph.initializer] == ["W"]
    assert [o.name for o in pruned.graph.output] == ["y"]
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    whole = make_session(two_output_model, threads=1).run(["y"], {"x": x})[0]
    alone = make_session(two_output_model, threads=1, outputs=["y"])
    assert [o.name for o in alone.get_outputs()] == ["y"]
    np.testing.assert_array_equal(alone.run(None, {"x": x})[0], whole)
    with pytest.raises(ValueError, match="has no output cams; outputs: y, z"):
        pruned_graph(two_output_model, ["cams"])
