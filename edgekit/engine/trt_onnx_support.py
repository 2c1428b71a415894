"""What TensorRT's ONNX parser accepts, per TensorRT version, as data (no TensorRT import).

:func:`parser_support` answers, for a TensorRT version such as ``"10.3"`` (JetPack 6.2) or
``"10.16"``: the newest ONNX opset its operator table documents, the operators it imports and
the element types documented for each, which quantized types its Q/DQ importer takes, and which
``trt``-domain custom operators it registers. :mod:`edgekit.engine.readiness` checks graphs
against it.

Sources (the tables are facts restated in our own format; no code is taken from them):

* ``onnx/onnx-tensorrt`` ``docs/operators.md`` at the parser commit each TensorRT release pins
  as its ``parsers/onnx`` submodule in ``NVIDIA/TensorRT`` (``git ls-tree v10.3.0 parsers/onnx``):
  10.0 ``eb43908b02a2``, 10.1 ``96e781103cfc`` (read in full), 10.14 ``c72727708d4e``,
  10.15 ``fa5aa9f61e77``, 10.16 ``6bde6596eca8``, 11.1 ``7c51a63a7191``.
* ``onnx/onnx-tensorrt`` ``docs/Changelog.md`` (TensorRT 10.0 ... 10.15 entries) and
  ``NVIDIA/TensorRT`` ``CHANGELOG.md`` at ``a892d22267d9`` (10.0 ... 11.1): which release added
  which operator or type.
* ``onnx/onnx-tensorrt`` ``onnxOpImporters.cpp`` / ``ModelImporter.cpp`` at ``96e781103cfc``
  (10.1 GA): the importer is chosen by operator *name*, its opset-dependent branches end at
  opset 19, a newer opset is not refused (only opsets below 7 draw a warning), Q/DQ infers the
  block size from the scale's shape (exactly one blocked axis) and refuses non-zero zero
  points, and INT4 tensors need an even last dimension.
* NVIDIA TensorRT documentation: "Quantization Schemes"
  (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html:
  INT4 is weight-only, per-block scales, block sizes {64, 128}, blocked axis one of the last
  two), "Working with Quantized Types" (10.11: INT8/FP8/FP4 quantize activations and weights,
  INT4 weight-only; symmetric only), ``IDequantizeLayer`` API reference (scale and zero point of
  rank <= 2, zero point all zeros, scale positive and a build-time constant), the "ONNX Opset
  Guide" (11.x: maximum opset 25, ONNX 1.20) and the TensorRT 11.5 release notes (opset 25).

Not verified: the operator table headers of TensorRT 10.2 ... 10.13 were not available, so
those versions carry the last verified value (opset 20, from 10.1) as a conservative lower
bound; 10.14 already documents opset 24. Operators added by those releases are taken from the
changelogs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "FP4_MIN_COMPUTE_CAPABILITY",
    "INT4_BLOCK_SIZES",
    "KNOWN_VERSIONS",
    "TYPE_ONLY_REVISIONS",
    "ParserSupport",
    "first_version_handling",
    "first_version_supporting",
    "parser_support",
    "revision_is_compatible",
    "version_tuple",
]

# --------------------------------------------------------------------------- element types

# The operator table's type names. ONNX element types map onto them in readiness/graph.py.
_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)

#: TensorRT 10.1's documented operators and element types (docs/operators.md at 96e781103cfc,
#: grouped by identical type lists). 10.0 (eb43908b02a2) is the same without DeformConv; its
#: table listed ConstantOfShape as FP32-only, which 10.1 corrected to the list below.
_BASE_OPERATORS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil", "Celu",
            "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf", "Exp",
            "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization", "GRU",
            "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization", "IsInf",
            "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool",
            "MatMul", "MaxPool", "MeanVarianceNormalization", "ParametricSoftplus", "Pow", "PRelu",
            "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
            "Reciprocal", "Resize", "RNN", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin", "Sinh",
            "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample",
        ),
        _F,
    ),
    **dict.fromkeys(
        (
            "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual", "IsNaN",
            "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Range", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
            "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth",
            "Sub", "Sum", "TopK",
        ),
        _FI,
    ),
    **dict.fromkeys(
        (
            "Concat", "Constant", "ConstantOfShape", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements",
            "GatherND", "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice",
            "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where",
        ),
        _FIB,
    ),
    **dict.fromkeys(("GridSample", "Mish", "NonMaxSuppression", "NonZero", "RoiAlign"), ("FP32", "FP16")),
    **dict.fromkeys(("And", "Not", "Or", "Xor"), ("BOOL",)),
    "Cast": _FI + ("UINT8", "BOOL"),
    "CastLike": _FI + ("UINT8", "BOOL"),
    "Mean": _F + ("FP8", "INT32", "INT64"),
    "Gelu": _F + ("INT8", "INT32", "INT64"),
    # Q/DQ are checked by readiness/quantization.py (types per version below), not here.
    "DequantizeLinear": ("INT8", "FP8", "INT4"),
}


@dataclass(frozen=True)
class _Release:
    """What one TensorRT release changed in its ONNX parser (relative to the one before)."""

    version: str
    #: operator -> documented types (new operators, or a replaced type list)
    operators: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: newest opset the release's docs/operators.md header documents; None: unchanged
    max_opset: int | None = None
    #: True when max_opset (or the inherited value) was read from that release's own table
    opset_verified: bool = False
    #: element types DequantizeLinear/QuantizeLinear take from this release on
    quantized_types: tuple[str, ...] = ()
    #: operators of the "trt" domain registered from this release on (ModelOpt exports them)
    custom_operators: tuple[str, ...] = ()
    #: (operator, ONNX revision) whose changed definition this release imports
    handled_revisions: tuple[tuple[str, int], ...] = ()
    source: str = ""


#: Every release we have data for, oldest first. Versions in between inherit the last entry.
_RELEASES: tuple[_Release, ...] = (
    _Release(
        "10.0",
        operators=_BASE_OPERATORS,
        max_opset=20,
        opset_verified=True,
        # 9.0: FP8 (and BF16); 10.0: "Added support for INT4 quantization" (Changelog).
        quantized_types=("INT8", "FP8", "INT4"),
        # onnxOpImporters.cpp at 10.1 registers these ModelOpt custom Q/DQ importers.
        custom_operators=(
            "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear", "TRT_INT4QuantizeLinear", "TRT_INT4DequantizeLinear",
        ),
        # The Q/DQ importer infers a blocked axis from the scale's shape (the block_size attribute
        # of opset 21 is not needed to import it): INT4 block quantization arrived with 10.0.
        handled_revisions=(("DequantizeLinear", 21), ("QuantizeLinear", 21)),
        source="onnx-tensorrt eb43908b02a2 docs/operators.md (opset 9-20); Changelog 10.0 EA/GA",
    ),
    _Release(
        "10.1",
        operators={"DeformConv": ("FP32", "FP16")},
        opset_verified=True,
        source="onnx-tensorrt 96e781103cfc docs/operators.md (still opset 9-20); Changelog 10.1: DeformConv",
    ),
    _Release("10.2", source="Changelog 10.2: no operator added"),
    _Release("10.3", source="Changelog 10.3: tensor axes for Slice, ScatterElements plugin v2; no operator added"),
    _Release(
        "10.4",
        operators=dict.fromkeys(("BlackmanWindow", "HammingWindow", "HannWindow"), ("FP32", "FP16")),
        source="Changelog 10.4: BlackmanWindow, HammingWindow, HannWindow (types from the 10.15 table)",
    ),
    _Release("10.5", operators={"STFT": ("FP32",)}, source="Changelog 10.5: real-valued STFT"),
    _Release("10.6", source="Changelog 10.6: ONNX submodule 1.17 (opset 22); no operator added"),
    _Release("10.7", source="Changelog 10.7: dynamic axes for Squeeze/Unsqueeze"),
    _Release(
        "10.8",
        # FLOAT4E2M1 for quantized networks; the 10.14 table lists FP4 (and FP8/INT4) constants.
        operators={
            "DequantizeLinear": ("INT8", "FP8", "FP4", "INT4"),
            "Constant": _FIB + ("FP8", "FP4", "INT4"),
            "ConstantOfShape": _FIB + ("FP8", "FP4", "INT4"),
        },
        quantized_types=("INT8", "FP8", "INT4", "FP4"),
        source="Changelog 10.8: FLOAT4E2M1 for quantized networks, Pow with integer exponents",
    ),
    _Release(
        "10.9",
        handled_revisions=(("GroupNormalization", 21),),
        source="Changelog 10.9: opset 21 GroupNormalization",
    ),
    _Release("10.10", source="Changelog 10.10: UINT8 constants for Q/DQ (DLA)"),
    _Release("10.11", source="Changelog 10.11: ONNX 1.18 (opset 23); no operator added"),
    _Release("10.12", operators={"Pow": _FI}, source="Changelog 10.12: integer-typed base tensors for Pow"),
    _Release("10.13", source="Changelog 10.13: external-weight memory, loadModelProto APIs"),
    _Release(
        "10.14",
        operators={"Attention": _F + ("INT8", "FP8")},
        max_opset=24,
        opset_verified=True,
        source="onnx-tensorrt c72727708d4e docs/operators.md (opset 9-24); Changelog 10.14: Attention",
    ),
    _Release(
        "10.15",
        operators={"RMSNormalization": _F, "RotaryEmbedding": _F, "TensorScatter": _F + ("INT32",)},
        opset_verified=True,
        source="onnx-tensorrt fa5aa9f61e77 docs/operators.md (opset 9-24); "
        "Changelog 10.15: RotaryEmbedding, RMSNormalization, TensorScatter",
    ),
    _Release("10.16", opset_verified=True, source="onnx-tensorrt 6bde6596eca8 docs/operators.md (opset 9-24)"),
    _Release(
        "11.0",
        operators={"Swish": _F},
        custom_operators=("TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate"),
        source="NVIDIA/TensorRT CHANGELOG 11.0: Swish, TRT_Attention, TRT_MoE, TRT_KVCacheUpdate",
    ),
    _Release("11.1", opset_verified=True, source="onnx-tensorrt 7c51a63a7191 docs/operators.md (opset 9-24)"),
    _Release(
        "11.2",
        operators={"DFT": ("FP32",)},
        source="TensorRT 11.2 release README: DFT through the cuFFT-backed FFTPlugin (types assumed FP32)",
    ),
    _Release(
        "11.5",
        max_opset=25,
        opset_verified=True,
        source="NVIDIA/TensorRT v11.5 release: ONNX opset 25, ONNX 1.22; ONNX Opset Guide (11.x): maximum opset 25",
    ),
)

KNOWN_VERSIONS: tuple[str, ...] = tuple(release.version for release in _RELEASES)

#: INT4 weights need per-block scales of one of these block sizes (Quantization Schemes).
INT4_BLOCK_SIZES: tuple[int, ...] = (64, 128)
#: FP4 GEMMs need Blackwell (TensorRT-RTX "Working with Quantized Types": compute capability 10.0).
FP4_MIN_COMPUTE_CAPABILITY = (10, 0)

#: ONNX operator revisions past opset 20 that only add element types (INT4/UINT4 in 21, BF16 in
#: 22, FLOAT4E2M1 in 23, FLOAT8E8M0 in 24, INT2/UINT2 in 25) or attributes whose defaults keep
#: the previous behaviour (onnx/onnx docs/Changelog.md). For a parser that reads operators by
#: name, such a revision imports like the older one; readiness/operators.py checks the element types
#: themselves. Revisions not listed (GroupNormalization-21's per-channel scale, Attention-24,
#: TopK-24, SplitToSequence-24, ...) may change meaning.
TYPE_ONLY_REVISIONS: Mapping[int, frozenset[str]] = MappingProxyType(
    {
        21: frozenset(
            {
                "Cast", "CastLike", "Constant", "ConstantOfShape", "Flatten", "Identity", "If", "Loop", "Pad",
                "QLinearMatMul", "Reshape", "Scan", "Shape", "Size", "Squeeze", "Transpose", "Unsqueeze",
            }
        ),
        22: frozenset(
            {
                "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "Bernoulli", "Conv", "ConvTranspose",
                "Cos", "Cosh", "DeformConv", "Det", "Dropout", "Elu", "EyeLike", "GRU", "GlobalAveragePool",
                "GlobalLpPool", "GlobalMaxPool", "GridSample", "HardSigmoid", "HardSwish", "InstanceNormalization",
                "LSTM", "LpNormalization", "LpPool", "MaxPool", "MaxRoiPool", "MaxUnpool", "Mish", "Multinomial",
                "NegativeLogLikelihoodLoss", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform",
                "RandomUniformLike", "RoiAlign", "Round", "Selu", "Sin", "Sinh", "Softplus", "Softsign", "Tan",
                "ThresholdedRelu",
            }
        ),
        23: frozenset(
            {
                "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity", "If",
                "Loop", "Pad", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size", "Squeeze", "Transpose",
                "Unsqueeze",
            }
        ),
        24: frozenset(
            {
                "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity", "If",
                "Loop", "Pad", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size", "Squeeze", "Transpose",
                "Unsqueeze",
            }
        ),
        25: frozenset(
            {
                "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten", "Identity", "If",
                "Loop", "Pad", "QuantizeLinear", "Reshape", "Scan", "Shape", "Size", "Squeeze", "Transpose",
                "Unsqueeze",
            }
        ),
    }
)


@dataclass(frozen=True)
class ParserSupport:
    """TensorRT ``version``'s ONNX parser, as far as the readiness checks need it."""

    version: str
    #: the release whose data this is (the newest known one not newer than ``version``)
    data_version: str
    max_opset: int
    #: False: ``max_opset`` is inherited from an older release's table (a lower bound)
    opset_verified: bool
    #: the release whose operator table states ``max_opset``
    opset_documented_by: str
    #: operator -> documented element types ("FP32", "INT64", ...)
    operators: Mapping[str, tuple[str, ...]]
    quantized_types: frozenset[str]
    custom_operators: frozenset[str]
    #: (operator, revision) pairs whose changed definitions the parser imports
    handled_revisions: frozenset[tuple[str, int]]
    sources: tuple[str, ...]

    @property
    def major(self) -> int:
        return version_tuple(self.version)[0]

    def supports(self, op_type: str) -> bool:
        return op_type in self.operators


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(version).split(".") if part.isdigit())


def parser_support(version: str) -> ParserSupport:
    """The parser data for TensorRT ``version`` ("10.3", "10.16.1", "11.1", ...).

    A version between two entries inherits the older entry's data (the releases in between
    added nothing we track); a version older than 10.0 raises ValueError (edgekit plans for
    TensorRT 10 and newer)."""
    wanted = version_tuple(version)[:2]
    if not wanted or wanted < version_tuple(_RELEASES[0].version):
        raise ValueError(f"no ONNX parser data for TensorRT {version} (edgekit covers {KNOWN_VERSIONS[0]} and newer)")
    operators: dict[str, tuple[str, ...]] = {}
    quantized: tuple[str, ...] = ()
    custom: set[str] = set()
    handled: set[tuple[str, int]] = set()
    sources: list[str] = []
    max_opset, verified, data_version, documented_by = 0, False, _RELEASES[0].version, _RELEASES[0].version
    for release in _RELEASES:
        if version_tuple(release.version) > wanted:
            break
        data_version = release.version
        operators.update(release.operators)
        quantized = release.quantized_types or quantized
        custom.update(release.custom_operators)
        handled.update(release.handled_revisions)
        if release.max_opset is not None:
            max_opset = release.max_opset
        verified = release.opset_verified
        if verified:
            documented_by = release.version
        sources.append(f"{release.version}: {release.source}")
    if wanted > version_tuple(data_version):
        verified = False  # newer than our data: what we know is a lower bound
    return ParserSupport(
        version=str(version),
        data_version=data_version,
        max_opset=max_opset,
        opset_verified=verified,
        opset_documented_by=documented_by,
        operators=MappingProxyType(operators),
        quantized_types=frozenset(quantized),
        custom_operators=frozenset(custom),
        handled_revisions=frozenset(handled),
        sources=tuple(sources),
    )


def first_version_supporting(op_type: str) -> str | None:
    """The first TensorRT release (we have data for) whose parser imports ``op_type``."""
    for release in _RELEASES:
        if op_type in release.operators:
            return release.version
    return None


def first_version_handling(op_type: str, revision: int) -> str | None:
    """The first TensorRT release (we have data for) that imports ONNX ``op_type``-``revision``
    as defined (a changed definition it learned, or a type-only revision of an op it imports)."""
    for release in _RELEASES:
        support = parser_support(release.version)
        if support.supports(op_type) and revision_is_compatible(op_type, revision, support):
            return release.version
    return None


def revision_is_compatible(op_type: str, revision: int, support: ParserSupport) -> bool:
    """Does ``support``'s parser import ONNX ``op_type``-``revision`` as it imports the op's
    revision at its documented opset (a type-only change, or one the parser handles)?"""
    if (op_type, revision) in support.handled_revisions:
        return True
    return op_type in TYPE_ONLY_REVISIONS.get(revision, frozenset())
