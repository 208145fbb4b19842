"""The static TensorRT 10 parser check, on small graphs that break one rule each."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.trt_compat import tensorrt_problems


def graph(nodes, inputs, outputs, inits=(), opset=18, domain_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domain_opsets)]
    return helper.make_model(g, opset_imports=opsets)


def image_input():
    return helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 8, 8, 3])


def out(name="y", shape=(1, 3, 8, 8)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def test_cast_first_then_transpose_passes():
    m = graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["f"], ["y"], perm=[0, 3, 1, 2]),
        ],
        [image_input()],
        [out()],
    )
    assert tensorrt_problems(m) == []


def test_uint8_into_a_transpose_is_refused():
    m = graph(
        [
            helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT),
        ],
        [image_input()],
        [out()],
    )
    problems = tensorrt_problems(m)
    assert any("uint8 tensor 'image' feeds a Transpose" in p for p in problems)
    assert any("produces uint8 tensor 't' inside the network" in p for p in problems)


def test_computed_convolution_weights_and_clip_bounds_are_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    w = [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), f"w{i}") for i in range(2)]
    lo = numpy_helper.from_array(np.array(0, np.float32), "lo")
    m = graph(
        [
            helper.make_node("Add", ["w0", "w1"], ["w"]),  # weights computed in the graph
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Add", ["lo", "lo"], ["hi"]),
            helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
        ],
        [x],
        [out(shape=(1, 2, 4, 4))],
        inits=[*w, lo],
    )
    problems = tensorrt_problems(m)
    assert any("(Conv): convolution weights must be a constant" in p and "'w'" in p for p in problems)
    assert any("(Clip): Clip max must be a constant" in p for p in problems)
    assert not any("Clip min" in p for p in problems)


def test_unsupported_operator_custom_domain_and_opset():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    m = graph(
        [
            helper.make_node("Erf", ["x"], ["e"]),  # real ONNX, not in the checked list
            helper.make_node("MyOp", ["e"], ["y"], domain="com.example"),
        ],
        [x],
        [out(shape=(4,))],
        opset=21,
        domain_opsets=["com.example"],
    )
    m.graph.output[0].type.tensor_type.ClearField("shape")
    problems = tensorrt_problems(onnx.shape_inference.infer_shapes(m))
    assert any("opset 21 is outside" in p for p in problems)
    assert any("(Erf): operator not in the checked TensorRT 10 support list" in p for p in problems)
    assert any("custom domain 'com.example'" in p for p in problems)


def test_wrong_input_type_for_an_operator():
    x = helper.make_tensor_value_info("x", TensorProto.BOOL, [4])
    m = graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", TensorProto.BOOL, [4])]
    )
    assert any("input type bool is not supported for Sigmoid" in p for p in tensorrt_problems(m))
