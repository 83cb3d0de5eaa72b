"""Graph surgery for ``python -m export import-onnx``: an ONNX classifier wrapped into the repository's contract.

A user's graph takes float pixels, normalised, NCHW or NHWC, at whatever size it was exported; the repository
serves ``image``: uint8 ``[batch, crop, crop, 3]`` RGB in, ``logits``: float32 ``[batch, classes]`` out, the
cast and mean/std inside the graph (what :class:`export.onnx_graph.ServingGraph` traces for our own models).
:func:`wrap_classifier` puts a small preprocessing graph in front of the user's (``onnx.compose.merge_models``)
and a cast to float32 behind it. No torch here: the graph is never rebuilt, only connected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_graph import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME

# Every name of the user's graph gets this prefix, so none can collide with ours ("image", "logits", "preprocess/").
USER_PREFIX = "imported/"
LAYOUTS = ("NCHW", "NHWC")
BATCH = "batch"
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


class OnnxImportError(RuntimeError):
    """An ONNX graph cannot be imported; the message says why in one line."""


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())  # onnx's and onnxruntime's messages span lines


Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class ClassifierSignature:
    """What the importer needs to know of the user's graph, read from its declared input and output."""

    input_name: str
    output_name: str
    layout: str  # "NCHW" or "NHWC": where the channels are
    batch: Dim  # the input's batch dimension; a fixed one is 1 (anything larger is refused)
    size: int | None  # the fixed square side, None where height and width are dynamic
    num_classes: int | None  # None where the graph leaves the logit width symbolic
    output_batch: Dim


def _dims(value_info: onnx.ValueInfoProto) -> list[Dim] | None:
    """The declared shape; None for an unknown rank. Some tools write -1 or 0 for a free dimension."""
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.dim_value > 0 else (d.dim_param or None) for d in tensor.shape.dim]


def _show(dims: list[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def read_signature(model: onnx.ModelProto, layout: str) -> ClassifierSignature:
    """The graph's image input and logits output, or a refusal saying why it is not an image classifier."""
    graph = model.graph
    # Older exporters list every weight as a graph input too; those have a value and are not fed.
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise OnnxImportError(f"not an image classifier: it takes {len(inputs)} inputs ({names}), expected one image batch")
    image = inputs[0]
    if not image.type.HasField("tensor_type"):
        raise OnnxImportError(f"not an image classifier: input {image.name!r} is not a tensor")
    elem_type = image.type.tensor_type.elem_type
    if elem_type != TensorProto.FLOAT:
        hint = "; import its float32 graph (the fp16 file is made from it)" if elem_type == TensorProto.FLOAT16 else ""
        raise OnnxImportError(
            f"not an image classifier: input {image.name!r} is {_type_name(elem_type)}, expected float32 pixels{hint}"
        )
    dims = _dims(image)
    if dims is None or len(dims) != 4:
        shown = "of unknown rank" if dims is None else f"{len(dims)}-D {_show(dims)}"
        raise OnnxImportError(
            f"not an image classifier: input {image.name!r} is {shown}, expected a 4-D image batch ({layout})"
        )
    channel_axis = 1 if layout == "NCHW" else 3
    channels = dims[channel_axis]
    if isinstance(channels, int) and channels != 3:
        other = "NHWC" if layout == "NCHW" else "NCHW"
        # The usual cause of a wrong channel count is a layout mix-up: say so when the other layout fits.
        hint = f"; with 3 at axis {4 - channel_axis} it looks {other}: pass --layout {other.lower()}" \
            if dims[4 - channel_axis] == 3 else ""
        raise OnnxImportError(
            f"not an RGB image classifier: input {image.name!r} {_show(dims)} has {channels} channel(s) at axis "
            f"{channel_axis} ({layout}); the repository serves 3-channel RGB images{hint}"
        )
    height, width = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    fixed = {d for d in (height, width) if isinstance(d, int)}
    if len(fixed) > 1:
        raise OnnxImportError(
            f"input {image.name!r} is fixed at {height}x{width}; the repository serves square crops, "
            "so height and width must be equal (or dynamic)"
        )
    batch = dims[0]
    if isinstance(batch, int) and batch != 1:
        raise OnnxImportError(
            f"input {image.name!r} has its batch fixed at {batch}; the service batches any number of images: "
            "export the graph with a dynamic (or size-1) batch axis"
        )

    if len(graph.output) != 1:
        names = ", ".join(repr(o.name) for o in graph.output)
        raise OnnxImportError(
            f"not an image classifier: it has {len(graph.output)} outputs ({names}), expected one: logits [N, classes]"
        )
    logits = graph.output[0]
    out_dims = _dims(logits)
    if out_dims is not None and len(out_dims) != 2:
        raise OnnxImportError(
            f"not an image classifier: output {logits.name!r} is {len(out_dims)}-D {_show(out_dims)}, "
            "expected 2-D logits [N, classes]"
        )
    out_type = logits.type.tensor_type.elem_type
    if out_type not in _FLOAT_TYPES:
        raise OnnxImportError(
            f"not an image classifier: output {logits.name!r} is {_type_name(out_type)}, expected float logits"
        )
    return ClassifierSignature(
        input_name=image.name, output_name=logits.name, layout=layout, batch=batch,
        size=fixed.pop() if fixed else None,
        num_classes=out_dims[1] if out_dims and isinstance(out_dims[1], int) else None,
        output_batch=out_dims[0] if out_dims else None,
    )


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_repository_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph at opset 17 or newer (the manifest's floor); an older one is converted, and the parity gate
    then checks the conversion against the original."""
    opset = default_opset(model)
    if opset >= DEFAULT_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, DEFAULT_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors and ValueErrors from its adapters
        raise OnnxImportError(
            f"the graph is at opset {opset}, the repository needs {DEFAULT_OPSET}+, and onnx could not convert it "
            f"({one_line(exc)}); re-export it at opset {DEFAULT_OPSET} or newer"
        ) from exc


def _free_batch(model: onnx.ModelProto, sig: ClassifierSignature) -> None:
    """A graph exported at batch 1 is served at any batch: its input and output batch become symbolic.

    Its intermediate shape annotations say batch 1 too, and are only hints: they go. A graph that really
    depends on batch 1 (a reshape to a constant shape) fails the parity gate, which runs a batch of 4."""
    graph = model.graph
    graph.input[[i.name for i in graph.input].index(sig.input_name)].type.tensor_type.shape.dim[0].dim_param = BATCH
    output_dims = graph.output[0].type.tensor_type.shape.dim
    if len(output_dims) == 2:
        output_dims[0].dim_param = BATCH
    del graph.value_info[:]


def wrap_classifier(
    model: onnx.ModelProto, sig: ClassifierSignature, crop: int, num_classes: int,
    mean: tuple[float, float, float], std: tuple[float, float, float],
) -> onnx.ModelProto:
    """``image`` uint8 ``[batch, crop, crop, 3]`` -> cast, ``(x - 255 mean) / (255 std)``, to the graph's layout
    -> the user's graph -> ``logits`` float32 ``[batch, num_classes]``."""
    user = onnx.ModelProto()
    user.CopyFrom(model)
    weights = {init.name for init in user.graph.initializer}
    # Weights listed as inputs would stay optional inputs of the served graph; as plain initializers they are
    # constants onnxruntime can fold.
    kept = [i for i in user.graph.input if i.name not in weights]
    del user.graph.input[:]
    user.graph.input.extend(kept)
    if sig.batch == 1:
        _free_batch(user, sig)
    user = onnx.compose.add_prefix(user, USER_PREFIX)
    # A symbolic batch keeps its name; an unknown or freed one is called "batch", as in our exports.
    batch = sig.batch if isinstance(sig.batch, str) else BATCH

    def companion(graph: onnx.GraphProto) -> onnx.ModelProto:
        # merge_models wants the same IR version and opsets on both sides.
        return helper.make_model(graph, ir_version=user.ir_version, opset_imports=list(user.opset_import))

    normalised = "preprocess/normalised"
    user_shape = [batch, 3, crop, crop] if sig.layout == "NCHW" else [batch, crop, crop, 3]
    # On the 0..255 scale, so the graph is one Sub and one Mul after the cast (as ServingGraph does it).
    mean_255 = np.asarray(mean, np.float32) * np.float32(255.0)
    inv_std_255 = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["preprocess/float"], to=TensorProto.FLOAT, name="preprocess/cast"),
        helper.make_node("Sub", ["preprocess/float", "preprocess/mean"], ["preprocess/centred"], name="preprocess/sub"),
        helper.make_node("Mul", ["preprocess/centred", "preprocess/inv_std"],
                         ["preprocess/nhwc" if sig.layout == "NCHW" else normalised], name="preprocess/mul"),
    ]
    if sig.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", ["preprocess/nhwc"], [normalised], perm=[0, 3, 1, 2],
                                      name="preprocess/to_nchw"))
    pre = helper.make_graph(
        nodes, "preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch, crop, crop, 3])],
        [helper.make_tensor_value_info(normalised, TensorProto.FLOAT, user_shape)],
        # Shaped [3]: they broadcast over the channels, the last axis of the NHWC image.
        initializer=[numpy_helper.from_array(mean_255, "preprocess/mean"),
                     numpy_helper.from_array(inv_std_255, "preprocess/inv_std")],
    )
    user_logits = "postprocess/user_logits"
    # A Cast, not an Identity: float16 or float64 logits become float32 too (a no-op on float32 ones).
    post = helper.make_graph(
        [helper.make_node("Cast", [user_logits], [OUTPUT_NAME], to=TensorProto.FLOAT, name="postprocess/cast")],
        "postprocess",
        [helper.make_tensor_value_info(user_logits, user.graph.output[0].type.tensor_type.elem_type, None)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, num_classes])],
    )
    try:
        merged = onnx.compose.merge_models(companion(pre), user, io_map=[(normalised, USER_PREFIX + sig.input_name)])
        merged = onnx.compose.merge_models(
            merged, companion(post), io_map=[(USER_PREFIX + sig.output_name, user_logits)],
            producer_name="archserve import-onnx", name=model.graph.name or "imported",
        )
        # merge_models lists each side's opsets, the same ones three times over: once is enough.
        del merged.opset_import[:]
        merged.opset_import.extend(user.opset_import)
        onnx.checker.check_model(merged)
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise OnnxImportError(f"could not wrap the graph: {one_line(exc)}") from exc
    return merged


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, the uint8 input and float32 output kept (what our fp16 exports are)."""
    # onnxruntime's converter (onnxconverter-common's, maintained with onnxruntime): it keeps ops without fp16
    # kernels in float32 behind casts. Imported here: it pulls in onnxruntime, which the graph surgery does not need.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the float weights: initializers and Constant nodes (some exporters store weights as those)."""
    tensors = list(model.graph.initializer) + [
        attr.t for node in model.graph.node if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"
    ]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in _FLOAT_TYPES)


def count_gmacs(model: onnx.ModelProto) -> float:
    """Billions of multiply-accumulates for one image, from the Conv, Gemm and MatMul nodes at their inferred
    shapes (the first axis taken as the batch); a node whose shapes are not all known is not counted."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, list[Dim]] = {
        info.name: dims for info in [*graph.input, *graph.value_info, *graph.output] if (dims := _dims(info))
    }
    shapes.update({init.name: list(init.dims) for init in graph.initializer})

    def known(name: str) -> list[int] | None:
        dims = shapes.get(name)
        return dims if dims and all(isinstance(d, int) for d in dims[1:]) else None

    macs = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, first, second = known(node.output[0]), known(node.input[0]), known(node.input[1])
        if node.op_type == "Conv":
            # Each output element sums over Cin/groups x the kernel: the weight's shape after Cout.
            per_output = int(np.prod(second[1:])) if second else None
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            per_output = second[1 if trans_b else 0] if second else None
        else:
            per_output = first[-1] if first else None
        if out and isinstance(per_output, int):
            macs += int(np.prod(out[1:])) * per_output
    return macs / 1e9
