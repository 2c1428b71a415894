"""The loaded ONNX graph the readiness checks read: name indexes over a ModelProto loaded without
its external data, every tensor's element type and dims, and the element-type helpers (names as
the parser's tables write them, bits, bytes)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EngineError
from edgekit.onnx_index import GraphIndex

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class GraphInput:
    """One graph input (or output): name, element type and dims."""

    name: str
    elem_type: int
    #: int (static), str (symbolic name or "a + b" expression) or None (unknown) per axis
    dims: tuple[int | str | None, ...]

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) or d <= 0 for d in self.dims)


class Graph(GraphIndex):
    """Name indexes over a ModelProto loaded without its external data."""

    def __init__(self, model: Any, path: Path):
        import onnx

        super().__init__(model)
        self.path = path
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        self.constants: dict[str, Any] = {}  # Constant node output -> its tensor
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.graph_outputs = {o.name for o in self.graph.output}
        self.inputs = tuple(
            GraphInput(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in self.graph.input if v.name not in self.inits
        )
        self.outputs = tuple(GraphInput(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in self.graph.output)
        # Element types of every tensor: ONNX shape inference over the metadata (~50 ms for a
        # 7,400-node decoder; it never needs the weights' values).
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int | str | None, ...]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
            for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                if value.type.HasField("tensor_type"):
                    self.types[value.name] = value.type.tensor_type.elem_type
                    self.shapes[value.name] = _dims(value)
        except Exception:  # inference is a help for type checks, never a requirement
            pass
        for name, tensor in list(self.inits.items()) + list(self.constants.items()):
            self.types[name] = tensor.data_type
            self.shapes[name] = tuple(int(d) for d in tensor.dims)
        self.local_functions = {(f.domain, f.name) for f in model.functions}

    def nodes(self) -> Iterator[Any]:
        """Every node, including those of If/Loop/Scan bodies and local functions."""
        stack = [self.graph]
        while stack:
            graph = stack.pop()
            for node in graph.node:
                yield node
                for attr in node.attribute:
                    if attr.HasField("g"):
                        stack.append(attr.g)
                    stack.extend(attr.graphs)
        for function in self.model.functions:
            yield from function.node

    def constant_tensor(self, name: str) -> Any | None:
        """The build-time constant behind ``name`` (an initializer or a Constant node), if any."""
        tensor = self.inits.get(name)
        return tensor if tensor is not None else self.constants.get(name)


def _dims(value: Any) -> tuple[int | str | None, ...]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return ()
    out: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def load_graph(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise EngineError("ONNX model not found", where=str(path), how="export the model first (edgekit compress)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(
            f"cannot read the ONNX graph: {first}",
            where=str(path),
            how="re-export the model (edgekit compress writes model.onnx into the bundle)",
        ) from None


def is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def elem_type_name(elem_type: int) -> str:
    import onnx

    names = {
        onnx.TensorProto.FLOAT: "FP32",
        onnx.TensorProto.FLOAT16: "FP16",
        onnx.TensorProto.BFLOAT16: "BF16",
        onnx.TensorProto.FLOAT8E4M3FN: "FP8",
        getattr(onnx.TensorProto, "FLOAT4E2M1", -1): "FP4",
    }
    if elem_type in names:
        return names[elem_type]
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def bits(elem_type: int) -> int:
    import onnx

    tp = onnx.TensorProto
    four = {tp.INT4, tp.UINT4, getattr(tp, "FLOAT4E2M1", -1)}
    eight = {tp.INT8, tp.UINT8, tp.BOOL, tp.FLOAT8E4M3FN, tp.FLOAT8E4M3FNUZ, tp.FLOAT8E5M2, tp.FLOAT8E5M2FNUZ,
             getattr(tp, "FLOAT8E8M0", -1)}
    sixteen = {tp.FLOAT16, tp.BFLOAT16, tp.INT16, tp.UINT16}
    thirty_two = {tp.FLOAT, tp.INT32, tp.UINT32}
    sixty_four = {tp.DOUBLE, tp.INT64, tp.UINT64, tp.COMPLEX64}
    if elem_type in four:
        return 4
    if elem_type in eight:
        return 8
    if elem_type in sixteen:
        return 16
    if elem_type in thirty_two:
        return 32
    if elem_type in sixty_four:
        return 64
    if elem_type == tp.COMPLEX128:
        return 128
    return 0  # strings and unknown types: no fixed size


def tensor_nbytes(tensor: Any) -> int:
    """Bytes of a tensor's values from its dims and type (4-bit types packed two per byte)."""
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    return (numel * bits(tensor.data_type) + 7) // 8


def shape_nbytes(shape: Iterable[int], elem_type: int) -> int:
    numel = 1
    for d in shape:
        numel *= max(int(d), 0)
    return (numel * bits(elem_type) + 7) // 8


def node_attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
