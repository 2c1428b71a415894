"""NNCF AWQ + scale estimation (PyTorch backend), converted into edgekit's integer grid.

``nncf.compress_weights`` does the work: data-aware AWQ (per-channel smoothing scales
searched on calibration activations), optional scale estimation (per-group scales refined
to minimise the layer's output error), then INT4/INT8 compression of every Linear inside the
decoder layers (``ratio=1``, so none falls back to 8 bits; ``lm_head`` and the embeddings are
in the ignored scope and stay float). This module then turns NNCF's result back into a plain
transformers model plus one :class:`~edgekit.weights.grid.QuantizedWeight` per Linear.

How NNCF 3.x's torch backend stores a compressed model (what :func:`extract_and_restore`
reads): the model is wrapped *in place* (``model.forward`` becomes a ``ForwardWithHooks``
and a ``HookStorage`` module is added as ``model.__nncf_hooks``). Each compressed
``Linear.weight`` Parameter then holds the packed integer codes (uint8, two 4-bit codes per
byte; int8/uint8 for 8 bits), and a decompressor module registered as a *post-hook on that
weight* rebuilds the float weight at every forward: ``INT4AsymmetricWeightsDecompressor``
(``_scale`` float16 ``[out, groups, 1]``, ``_zero_point`` packed uint4), the symmetric one
(signed codes in [-8, 7], no zero point) and their INT8 counterparts. Decompression runs in
float16 (``(q - z) * scale`` computed in float16, then cast to the weight's dtype).

Where AWQ's smoothing scales go: ``W · x = (W · diag(s)) · (diag(1/s) · x)``. NNCF multiplies
the quantized layer's input columns by ``s`` and must put ``1/s`` on whatever produces ``x``:
- pattern Linear → Mul → Linear (Llama's ``up_proj → act(gate)·up → down_proj``): ``1/s`` is
  multiplied into the rows of the first Linear's weight (``up_proj``), *before* that one is
  quantized, so it ends up inside ``up_proj``'s integer codes;
- patterns Activation → (Mul →) Linear: NNCF inserts an ``SQMultiply`` pre-hook (an extra
  elementwise multiply) in front of the Linears. A plain transformers model has no place for
  it, so we fold it into the float parameter of the op producing that input (a norm's
  ``weight`` (+ ``bias``), or a float Linear's rows); a scale behind a nonlinearity cannot be
  folded and is refused.
Any float Parameter NNCF replaced stays replaced in ``model`` (NNCF assigns ``param.data``),
so after :func:`awq_quantize` the model's float parameters plus the returned
QuantizedWeights are exactly NNCF's model, up to NNCF's float16 decompression rounding
(recorded as ``max_abs_diff``). In Llama-family models NNCF 3.4 finds AWQ patterns only for
``down_proj`` (RMSNorm ends in a Mul that no activation precedes, ``o_proj`` follows a
reshape), so the norms are never touched there: the smoothing lives in ``up_proj``'s codes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import StageError
from edgekit.weights.grid import QuantizedWeight, max_code

WHERE = "quantize.method awq"


@dataclass
class AwqResult:
    """What :func:`awq_quantize_detailed` did, for reports and tests."""

    weights: dict[str, QuantizedWeight]
    # Float parameters NNCF changed outside the quantized weights (already in ``model``).
    changed_float_params: list[str] = field(default_factory=list)
    # SQMultiply scales folded into float parameters: op whose output they scaled -> parameter(s).
    folded_scales: dict[str, list[str]] = field(default_factory=dict)
    # max |QuantizedWeight.dequantize() - NNCF's own decompressed weight| over all layers
    # (NNCF decompresses in float16; our grid dequantizes in float32).
    max_abs_diff: float = 0.0
    # Asymmetric groups with zero point 0 shifted losslessly to zero 1 (codes + 1), and the
    # ones that could not be shifted (a code already at the top of the range).
    zero_shifted_groups: int = 0
    zero_point_refitted_groups: int = 0  # zero 0 with the top code in use: refitted to zero 1
    nncf_version: str = ""


@dataclass
class NncfRun:
    """A model compressed by NNCF in place (still wrapped, with its decompression hooks)."""

    model: Any
    example_input: dict
    targets: list[str]  # weight names of the decoder Linears that were compressed
    before: dict[str, tuple]  # name -> (data_ptr, version, dtype, requires_grad) before NNCF
    use_cache: Any
    settings: dict


# ---------------------------------------------------------------------------------------
# Public API


def awq_quantize(
    model: Any,
    calibration: list[Any],
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    awq: bool = True,
    scale_estimation: bool = True,
) -> dict[str, QuantizedWeight]:
    """Run NNCF weight compression (AWQ + scale estimation) on every decoder Linear of
    ``model`` and return ``{module name: QuantizedWeight}``.

    ``group_size`` <= 0 means one scale per output channel. Afterwards ``model`` is a plain
    transformers model again: quantized Linears hold their dequantized weights, and every
    float parameter NNCF changed (AWQ's folded scales) is in place. On a
    :class:`~edgekit.errors.StageError` raised *before* NNCF starts the model is untouched;
    if NNCF itself fails, discard the model.
    """
    return awq_quantize_detailed(
        model, calibration, bits=bits, group_size=group_size, symmetric=symmetric, awq=awq, scale_estimation=scale_estimation
    ).weights


def awq_quantize_detailed(
    model: Any,
    calibration: list[Any],
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    awq: bool = True,
    scale_estimation: bool = True,
) -> AwqResult:
    """:func:`awq_quantize` with the bookkeeping (:class:`AwqResult`)."""
    run = run_nncf(
        model, calibration, bits=bits, group_size=group_size, symmetric=symmetric, awq=awq, scale_estimation=scale_estimation
    )
    return extract_and_restore(run)


# ---------------------------------------------------------------------------------------
# Step 1: NNCF


def _import_nncf_quietly() -> Any:
    """Import nncf with telemetry off (its own no-op stub, as NNCF uses in CI) and its
    logger at ERROR."""
    os.environ["OPENVINO_TELEMETRY_OPT_OUT"] = "1"
    import nncf
    from nncf.telemetry import decorator as telemetry_decorator
    from nncf.telemetry import wrapper as telemetry_wrapper

    if not isinstance(telemetry_wrapper.telemetry, telemetry_wrapper.NNCFTelemetryStub):
        stub = telemetry_wrapper.NNCFTelemetryStub()
        telemetry_wrapper.telemetry = stub
        telemetry_decorator.telemetry = stub
        import nncf.telemetry as telemetry_package

        telemetry_package.telemetry = stub
    return nncf


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs INFO tables and draws rich progress bars on stdout: keep errors only."""
    logger = logging.getLogger("nncf")
    level = logger.level
    handler_levels = [(h, h.level) for h in logger.handlers]
    logger.setLevel(logging.ERROR)
    for handler, _ in handler_levels:
        handler.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        for handler, old in handler_levels:
            handler.setLevel(old)


def _decoder_linear_weights(model: Any) -> list[str]:
    from edgekit.weights.layers import decoder_linears

    try:
        names = [f"{name}.weight" for name, _module in decoder_linears(model)]
    except ValueError as exc:
        raise StageError(str(exc), where=WHERE, how="use a Llama-like causal LM (model.model.layers)") from exc
    if not names:
        raise StageError("the decoder layers contain no torch.nn.Linear", where=WHERE, how="use a Llama-like causal LM")
    return names


def _check_settings(model: Any, targets: list[str], calibration: list[Any], *, bits: int, group_size: int, awq: bool, scale_estimation: bool) -> None:
    if bits not in (4, 8):
        raise StageError(f"bits {bits} is not supported by NNCF's integer weight compression", where=WHERE, how="use bits 4 (or 8)")
    if bits == 8 and group_size > 0:
        raise StageError(
            f"NNCF's INT8 weight modes are per output channel only, group_size {group_size} was asked",
            where=WHERE,
            how="use group_size null (one scale per channel) with bits 8, or bits 4 for group-wise scales",
        )
    if bits == 8 and (awq or scale_estimation):
        raise StageError(
            "NNCF runs AWQ and scale estimation on 4-bit weights only (its INT8 modes take no dataset)",
            where=WHERE,
            how="use bits 4, or turn awq and scale_estimation off for 8 bits",
        )
    if not calibration:
        raise StageError(
            "NNCF's torch backend needs at least one calibration sample (to trace the model and collect activations)",
            where=WHERE,
            how="give the quantize stage calibration samples",
        )
    if group_size > 0:
        for name in targets:
            in_features = model.get_parameter(name).shape[1]
            if in_features % group_size:
                raise StageError(
                    f"group_size {group_size} does not divide {name.removesuffix('.weight')}'s {in_features} input channels",
                    where=WHERE,
                    how="pick a group_size that divides every layer's input size",
                )


def run_nncf(
    model: Any,
    calibration: list[Any],
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    awq: bool = True,
    scale_estimation: bool = True,
) -> NncfRun:
    """Compress ``model`` in place with ``nncf.compress_weights``; the result is NNCF's own
    compressed model (wrapped, with decompression hooks): call it to get NNCF's outputs,
    then :func:`extract_and_restore`."""
    import torch

    targets = _decoder_linear_weights(model)
    _check_settings(model, targets, calibration, bits=bits, group_size=group_size, awq=awq, scale_estimation=scale_estimation)
    nncf = _import_nncf_quietly()
    from nncf.quantization.algorithms.weight_compression.torch_backend import PTWeightCompressionAlgoBackend
    from nncf.torch.model_creation import wrap_model

    device = next(model.parameters()).device

    def to_inputs(ids: Any) -> dict:
        ids = ids.to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    example_input = to_inputs(calibration[0])
    before = {
        name: (p.data_ptr(), p._version, p.dtype, p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)
    }
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no cache objects in the traced graph
    model.eval()
    if symmetric:
        mode = nncf.CompressWeightsMode.INT4_SYM if bits == 4 else nncf.CompressWeightsMode.INT8_SYM
    else:
        mode = nncf.CompressWeightsMode.INT4_ASYM if bits == 4 else nncf.CompressWeightsMode.INT8_ASYM
    settings = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "awq": awq, "scale_estimation": scale_estimation}
    try:
        with _quiet_nncf(), torch.no_grad():
            wrapped = wrap_model(model, example_input=example_input, trace_parameters=True)
            graph = wrapped.get_graph()
            # Everything that carries a weight and is not a decoder Linear stays float
            # (embeddings, lm_head, a tied head sharing the embedding).
            wanted, ignored, seen = set(targets), [], set()
            for node in graph.get_all_nodes():
                if not PTWeightCompressionAlgoBackend.is_node_with_weights(node, graph):
                    continue
                names = {n for n, _ in PTWeightCompressionAlgoBackend.get_weight_names_and_port_ids(node, graph)}
                if names & wanted:
                    seen |= names & wanted
                else:
                    ignored.append(node.node_name)
            missing = sorted(wanted - seen)
            if missing:
                raise StageError(
                    f"NNCF's trace of the model does not reach {len(missing)} decoder Linear(s), e.g. {missing[0]}",
                    where=WHERE,
                    how="use method gptq or rtn for this architecture",
                )
            kwargs: dict[str, Any] = {"mode": mode, "ignored_scope": nncf.IgnoredScope(names=ignored, validate=False)}
            if bits == 4:
                kwargs.update(
                    ratio=1.0,  # every targeted layer in 4 bits, no INT8 backup
                    group_size=group_size if group_size > 0 else -1,
                    all_layers=True,  # no backup precision for the "last" layer either
                    awq=awq,
                    scale_estimation=scale_estimation,
                    dataset=nncf.Dataset(calibration, to_inputs),
                    subset_size=len(calibration),
                )
            nncf.compress_weights(wrapped, **kwargs)
    except BaseException as exc:
        _unwrap(model)
        model.config.use_cache = use_cache
        refused = (nncf.ParameterNotSupportedError, nncf.ValidationError, nncf.InvalidGroupSizeError, nncf.UnsupportedModelError)
        if isinstance(exc, refused):
            raise StageError(
                f"NNCF refused the settings: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}",
                where=WHERE,
                how="change bits/group_size/symmetric/awq/scale_estimation (NNCF's torch backend: INT4 sym/asym per group "
                "or per channel with AWQ and scale estimation; INT8 per channel without them)",
            ) from exc
        raise
    return NncfRun(model=model, example_input=example_input, targets=targets, before=before, use_cache=use_cache, settings=settings)


# ---------------------------------------------------------------------------------------
# Step 2: read NNCF's compressed representation, put a plain model back


def _decompressor_to_grid(decompressor: Any, packed: Any, shape: tuple[int, int]) -> QuantizedWeight:
    """Codes, scales and zero points of one NNCF decompressor, on our unsigned grid."""
    import torch
    from nncf.torch.quantization.layers import (
        INT4AsymmetricWeightsDecompressor,
        INT4SymmetricWeightsDecompressor,
        INT8AsymmetricWeightsDecompressor,
        INT8SymmetricWeightsDecompressor,
    )
    from nncf.torch.quantization.quantize_functions import unpack_int4, unpack_uint4

    out_features, in_features = shape
    if isinstance(decompressor, INT4AsymmetricWeightsDecompressor):
        bits, symmetric = 4, False
        codes = unpack_uint4(packed).reshape(decompressor.compressed_weight_shape)
        zeros = unpack_uint4(decompressor._zero_point).reshape(decompressor.zero_point_shape)
    elif isinstance(decompressor, INT4SymmetricWeightsDecompressor):
        bits, symmetric = 4, True
        codes = unpack_int4(packed).reshape(decompressor.compressed_weight_shape).to(torch.int32) + 8  # signed -> unsigned
        zeros = None
    elif isinstance(decompressor, INT8AsymmetricWeightsDecompressor):
        bits, symmetric = 8, False
        codes, zeros = packed, decompressor._zero_point
    elif isinstance(decompressor, INT8SymmetricWeightsDecompressor):
        bits, symmetric = 8, True
        codes, zeros = packed.to(torch.int32) + 128, None
    else:
        raise StageError(f"unexpected NNCF decompressor {type(decompressor).__name__}", where=WHERE, how="report this as an edgekit bug")
    scales = decompressor._scale.float().reshape(out_features, -1)  # float16 values already
    n_groups = scales.shape[1]
    if in_features % n_groups:
        raise StageError(f"NNCF's scale shape {tuple(decompressor._scale.shape)} does not fit a [{out_features}, {in_features}] weight", where=WHERE)
    group = in_features // n_groups
    codes = codes.to(torch.int32).reshape(out_features, in_features)
    if zeros is None:
        zeros = torch.full((out_features, n_groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        zeros = zeros.to(torch.int32).reshape(out_features, n_groups)
    return QuantizedWeight(
        qweight=codes,
        scales=scales,
        zeros=zeros,
        g_idx=torch.arange(in_features, dtype=torch.int32) // group,
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )


def _shift_zero_points(qw: QuantizedWeight) -> tuple[int, int]:
    """GPTQ's v1 layout stores ``zero - 1``, so zero point 0 has no encoding there. Where a
    group with zero 0 has no code at the top of the range, ``(q+1) - 1 == q - 0`` moves it to
    zero 1 without changing a single dequantized value; the other zero-0 groups are refitted
    (see below). Returns (shifted exactly, refitted)."""
    import torch

    if qw.symmetric:
        return 0, 0
    at_zero = qw.zeros == 0
    if not bool(at_zero.any()):
        return 0, 0
    top = max_code(qw.bits)
    group_max = qw.qweight.reshape(qw.out_features, qw.n_groups, qw.group_size).amax(dim=2)  # contiguous groups
    shiftable = at_zero & (group_max < top)
    if bool(shiftable.any()):
        qw.qweight = qw.qweight + shiftable[:, qw.g_idx.long()].to(torch.int32)
        qw.zeros = qw.zeros + shiftable.to(torch.int32)
    stuck = at_zero & ~shiftable
    if bool(stuck.any()):
        # Zero 0 with the top code in use: refit those groups (all weights >= 0) onto a grid
        # with zero 1 whose top code still reaches the group's maximum. This moves their
        # values by at most half a (slightly larger) step; counted for the report.
        g = qw.g_idx.long()
        values = qw.dequantize()
        new_scale = (qw.scales * top / (top - 1)).half().float()
        refit_codes = torch.clamp(torch.round(values / new_scale[:, g]) + 1, 0, top).to(torch.int32)
        mask = stuck[:, g]
        qw.qweight = torch.where(mask, refit_codes, qw.qweight)
        qw.scales = torch.where(stuck, new_scale, qw.scales)
        qw.zeros = torch.where(stuck, torch.ones_like(qw.zeros), qw.zeros)
    return int(shiftable.sum()), int(stuck.sum())


def _unwrap(model: Any) -> None:
    """Undo nncf's in-place wrap: instance ``forward``, DataParallel hook, hook storage."""
    from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE

    for attr in ("forward", "_replicate_for_data_parallel"):
        model.__dict__.pop(attr, None)
    model._modules.pop(ATR_HOOK_STORAGE, None)


def extract_and_restore(run: NncfRun) -> AwqResult:
    """Turn NNCF's compressed model (``run.model``) back into a plain transformers model and
    return the QuantizedWeights (see the module docstring for what NNCF stores where)."""
    import torch
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseWeightsDecompressor, SQMultiply

    nncf = _import_nncf_quietly()
    model = run.model
    storage = get_hook_storage(model)
    result = AwqResult(weights={}, nncf_version=nncf.__version__)
    scale_hooks: list[tuple[str, int, Any]] = []
    compressed: set[str] = set()
    with torch.no_grad():
        for hook_name, hook in list(storage.named_hooks(remove_duplicate=False)):
            hook_type, op_name, port_id = decode_hook_name(hook_name)
            if isinstance(hook, BaseWeightsDecompressor) and hook_type == "post_hooks":
                param = model.get_parameter(op_name)
                dtype = run.before[op_name][2]
                packed = param.data
                hook.eval()
                nncf_weight = hook(packed)  # NNCF's own decompressed weight
                qw = _decompressor_to_grid(hook, packed, tuple(nncf_weight.shape))
                shifted, left = _shift_zero_points(qw)
                result.zero_shifted_groups += shifted
                result.zero_point_refitted_groups += left
                weight = qw.dequantize(dtype).to(packed.device)
                result.max_abs_diff = max(result.max_abs_diff, float((weight.float() - nncf_weight.float()).abs().max()))
                param.data = weight
                param.requires_grad = run.before[op_name][3]
                result.weights[op_name.removesuffix(".weight")] = qw
                compressed.add(op_name)
            elif isinstance(hook, SQMultiply) and hook_type == "pre_hooks":
                scale_hooks.append((op_name, port_id, hook.scale.detach()))
            else:
                _unwrap(model)
                model.config.use_cache = run.use_cache
                raise StageError(f"unexpected NNCF hook {type(hook).__name__} on {op_name}", where=WHERE, how="report this as an edgekit bug")
    _unwrap(model)
    model.config.use_cache = run.use_cache
    missing = sorted(set(run.targets) - compressed)
    if missing:
        raise StageError(f"NNCF left {len(missing)} decoder Linear(s) uncompressed, e.g. {missing[0]}", where=WHERE, how="report this as an edgekit bug")
    if scale_hooks:
        result.folded_scales = _fold_scale_hooks(model, run.example_input, scale_hooks, compressed)
    for name, param in model.named_parameters(remove_duplicate=False):
        ptr, version, _dtype, requires_grad = run.before.get(name, (None, None, None, None))
        param.requires_grad = requires_grad if requires_grad is not None else param.requires_grad
        if name not in compressed and (param.data_ptr(), param._version) != (ptr, version):
            result.changed_float_params.append(name)
    model.eval()
    return result


def _fold_scale_hooks(model: Any, example_input: dict, hooks: list[tuple[str, int, Any]], compressed: set[str]) -> dict[str, list[str]]:
    """Fold NNCF's SQMultiply activation scales (``x * a`` in front of Linears) into the
    float parameter of the op that produces ``x``. ``model`` must be unwrapped already."""
    import torch
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    from nncf.torch.graph import operator_metatypes as om
    from nncf.torch.model_graph_manager import find_const_node_in_constant_subgraph

    with _quiet_nncf(), torch.no_grad():
        graph = build_nncf_graph(model, example_input)
    passthrough = (om.PTNoopMetatype, om.PTDropoutMetatype)

    def producer_of(node: Any, port: int) -> Any:
        for prev in graph.get_previous_nodes(node):
            if any(edge.input_port_id == port for edge in graph.get_edges(prev, node)):
                return prev
        return None

    def refuse(op: str, why: str) -> StageError:
        return StageError(
            f"NNCF's AWQ put a smoothing scale in front of {op} that cannot be folded into the model: {why}",
            where=WHERE,
            how="turn awq off for this architecture (scale_estimation alone works), or use method gptq",
        )

    # The edge each scale sits on, moved back through single-consumer pass-through ops
    # (``.to``, ``contiguous``, dropout): (producer op, the op right after it).
    entries: dict[str, dict[str, Any]] = {}  # producer -> {op after producer: scale}
    origin: dict[str, str] = {}  # producer -> the first hook's op (for messages)
    for op_name, port, scale in hooks:
        after, producer = graph.get_node_by_name(op_name), producer_of(graph.get_node_by_name(op_name), port)
        while producer is not None and producer.metatype in passthrough and len(graph.get_next_nodes(producer)) == 1:
            after, producer = producer, producer_of(producer, 0)
        if producer is None:
            raise refuse(op_name, "its input has no producing op")
        entries.setdefault(producer.node_name, {})[after.node_name] = scale.reshape(-1)
        origin.setdefault(producer.node_name, op_name)

    folded: dict[str, list[str]] = {}
    for producer_name, scaled in entries.items():
        producer, op_name = graph.get_node_by_name(producer_name), origin[producer_name]
        vector = next(iter(scaled.values()))
        # Every consumer of the producer must see the same scale, or folding changes the others.
        for consumer in graph.get_next_nodes(producer):
            other = scaled.get(consumer.node_name)
            if other is None or not torch.equal(other, vector):
                raise refuse(op_name, f"{producer_name} also feeds {consumer.node_name} without that scale")
        consts = []  # float parameters feeding the producer directly (not through e.g. `1 + w`)
        for prev in graph.get_previous_nodes(producer):
            const = find_const_node_in_constant_subgraph(prev, graph)
            if const is not None:
                if const.node_name != prev.node_name:
                    raise refuse(op_name, f"{producer.node_name} uses {const.layer_attributes.name} through other ops")
                consts.append(const.layer_attributes.name)
        channels = vector.numel()
        if producer.metatype is om.PTMulMetatype and len(consts) == 1:
            param = model.get_parameter(consts[0])
            if param.numel() != channels:
                raise refuse(op_name, f"{consts[0]} has {param.numel()} values for {channels} channels")
            param.data = (param.data.float() * vector.reshape(param.shape).float()).to(param.dtype)
        elif producer.metatype is om.PTLayerNormMetatype and consts:
            for name in consts:
                param = model.get_parameter(name)
                param.data = (param.data.float() * vector.float()).to(param.dtype)
        elif producer.metatype is om.PTLinearMetatype and consts:
            if any(name in compressed for name in consts):
                raise refuse(op_name, f"{producer.node_name} is itself quantized")
            for name in consts:
                param = model.get_parameter(name)
                view = vector.reshape(-1, 1) if param.dim() == 2 else vector
                param.data = (param.data.float() * view.float()).to(param.dtype)
        else:
            raise refuse(op_name, f"it follows {producer.node_name} ({producer.metatype.__name__}), which has no float parameter to scale")
        folded[producer_name] = consts
    return folded
