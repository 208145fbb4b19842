"""Static check that an ONNX graph is one TensorRT 10's ONNX parser takes, run at export time.

TensorRT cannot be installed on the build machines, so this is what stands between an export and a
``build-engine`` that fails on the line PC. It checks the graph against the parser's published
support matrix (onnx-tensorrt ``docs/operators.md`` for TensorRT 10, and the TensorRT operator and
data type documentation), for the operators this project's graphs use:

- the opset is within TensorRT 10.0's range (9 to 20);
- every operator is one the parser supports, with its supported data types;
- uint8 appears only where TensorRT allows it: a network input (or output) going straight into
  (out of) a Cast. Its Shuffle layer, which a Transpose becomes, lists no uint8 in TensorRT 10's
  operator documentation (10.6 and the current page);
- inputs the parser wants as constants are constants: convolution weights, Clip bounds, reduction
  and (un)squeeze axes, TopK's K;
- no external data files.

It cannot prove that TensorRT builds the graph (only a real build can), but each rule here is one a
graph of ours has broken or could break.
"""

from __future__ import annotations

import onnx

OPSET_RANGE = (9, 20)

F = {"float", "float16"}
FI = F | {"int32", "int64"}
ANY = FI | {"bool", "int8"}
# operator -> data types of its first input that the parser accepts (TensorRT 10 support matrix)
SUPPORTED: dict[str, set[str]] = {
    "Add": FI,
    "Sub": FI,
    "Mul": FI,
    "Div": FI,
    "Reciprocal": F,
    "Sqrt": F,
    "Relu": F,
    "Clip": F | {"int8"},
    "Sigmoid": F,
    "Conv": F,
    "Gemm": F,
    "MatMul": F,
    "ReduceSum": F | {"int32"},
    "ReduceMean": F,
    "ReduceMax": F,
    "ReduceL2": F,
    "Transpose": ANY,
    "Reshape": ANY,
    "Unsqueeze": ANY,
    "Squeeze": ANY,
    "Concat": ANY,
    "Gather": ANY,
    "Constant": ANY,
    "Identity": ANY,
    "Shape": ANY,
    "TopK": F,
    "Cast": ANY | {"uint8"},
}
# (operator, input index) that the parser needs as a constant (initializer or Constant node)
MUST_BE_CONSTANT = {
    ("Conv", 1): "convolution weights",
    ("Clip", 1): "Clip min",
    ("Clip", 2): "Clip max",
    ("ReduceSum", 1): "reduction axes",
    ("ReduceMean", 1): "reduction axes",
    ("ReduceMax", 1): "reduction axes",
    ("ReduceL2", 1): "reduction axes",
    ("Unsqueeze", 1): "axes",
    ("Squeeze", 1): "axes",
    ("TopK", 1): "K",
}


def _dtype_name(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name.replace("float32", "float")


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Everything in ``model`` that TensorRT 10's ONNX parser would refuse; empty when none."""
    problems: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset} is outside TensorRT 10's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        problems.append("weights are stored in external data files; TensorRT builds from one file here")

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types: dict[str, str] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = _dtype_name(vi.type.tensor_type.elem_type)
    for t in g.initializer:
        types[t.name] = _dtype_name(t.data_type)
    constants = {t.name for t in g.initializer}
    constants |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}

    for n in g.node:
        where = f"node {n.name or n.output[0]!r} ({n.op_type})"
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {n.domain!r}")
            continue
        if n.op_type not in SUPPORTED:
            problems.append(f"{where}: operator not in the checked TensorRT 10 support list")
            continue
        if n.input and n.input[0] and types.get(n.input[0]) not in SUPPORTED[n.op_type] | {None, "uint8"}:
            problems.append(f"{where}: input type {types[n.input[0]]} is not supported for {n.op_type}")
        for i, name in enumerate(n.input):
            what = MUST_BE_CONSTANT.get((n.op_type, i))
            if what and name and name not in constants:
                problems.append(f"{where}: {what} must be a constant for TensorRT, got computed tensor {name!r}")
        for name in n.input:
            if types.get(name) == "uint8" and not (n.op_type == "Cast" and name in graph_inputs):
                problems.append(
                    f"{where}: uint8 tensor {name!r} feeds a {n.op_type}; TensorRT takes uint8 only as a "
                    "network input going straight into a Cast"
                )
        for name in n.output:
            if types.get(name) == "uint8" and not (n.op_type == "Cast" and name in graph_outputs):
                problems.append(f"{where}: produces uint8 tensor {name!r} inside the network")
    return problems
