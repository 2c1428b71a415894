"""The ``export_onnx`` stage: checkpoint -> ONNX with KV cache, parity-checked."""

from __future__ import annotations

import json

from pydantic import Field

from edgekit.pipeline.registry import CHECKPOINT, ONNX, StageConfig, register_stage


class ExportOnnxConfig(StageConfig):
    opset: int = Field(18, ge=14, le=23, description="ONNX opset (18 = optimum's minimum for Llama; TensorRT 10.3 parses up to 20)")
    parity_tolerance: float = Field(
        1e-3, gt=0, description="max |logits_onnx - logits_pytorch| allowed (fp32); over it the stage fails"
    )
    parity_prompts: list[str] | None = Field(None, description="prompts for the parity check (default: three fixed prompts)")


def run_export_onnx(ctx) -> dict:
    from edgekit.errors import ParityError
    from edgekit.export.onnx_export import MODEL_FILE, describe, export_decoder
    from edgekit.export.parity import DEFAULT_PROMPTS, check_parity
    from edgekit.models.checkpoint import load_checkpoint

    checkpoint = ctx.inputs[CHECKPOINT]
    trust = ctx.recipe.trust_remote_code
    with ctx.progress(None, "optimum-onnx export (text-generation-with-past)"):
        export_decoder(checkpoint, ctx.output_dir, opset=ctx.config.opset, trust_remote_code=trust)
    model, tokenizer = load_checkpoint(checkpoint, dtype="float32", trust_remote_code=trust)
    prompts = tuple(ctx.config.parity_prompts or DEFAULT_PROMPTS)
    with ctx.progress(None, f"parity vs PyTorch on {len(prompts)} prompts"):
        parity = check_parity(model, tokenizer, ctx.output_dir / MODEL_FILE, prompts=prompts)
    parity["tolerance"] = ctx.config.parity_tolerance
    (ctx.output_dir / "parity.json").write_text(json.dumps(parity, indent=2) + "\n")
    if parity["logits_max_abs_diff"] > ctx.config.parity_tolerance:
        raise ParityError(
            f"ONNX logits differ from PyTorch by {parity['logits_max_abs_diff']:.3g} "
            f"(tolerance {ctx.config.parity_tolerance:g}; per-output diffs in parity.json)",
            where=f"stage {ctx.name}",
            how="raise export_onnx.parity_tolerance if the difference is expected (e.g. fp16), "
            "or report the model's architecture as an export bug",
        )
    info = describe(ctx.output_dir / MODEL_FILE)
    return {
        "opset": info["opset"],
        "nodes": info["nodes"],
        "onnx_bytes": sum(p.stat().st_size for p in ctx.output_dir.glob("model.onnx*")),
        "logits_max_abs_diff": parity["logits_max_abs_diff"],
        "present_max_abs_diff": parity["present_max_abs_diff"],
        "greedy_agreement": parity["greedy_agreement"],
        "parity_tolerance": ctx.config.parity_tolerance,
    }


register_stage(
    "export_onnx",
    config=ExportOnnxConfig,
    summary="checkpoint -> ONNX decoder with KV cache (optimum-onnx), parity-checked in ONNX Runtime",
    run="edgekit.export.stage:run_export_onnx",
    requires=(CHECKPOINT,),
    produces=ONNX,
    uses=("model",),  # trust_remote_code changes what optimum may execute
)
