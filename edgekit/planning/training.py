"""Device memory per GPU of the ``distill`` stage, predicted from the shapes alone.

What one training process holds on its GPU (decimal GB, :data:`edgekit.sizing.GB`), for
the way :mod:`edgekit.distill.loop` trains:

* **student weights**: fp32 master weights (4 bytes per parameter; autocast computes in
  bf16/fp16 but the parameters stay fp32);
* **gradients**: one per weight, in the weights' dtype (4 bytes); under DDP (more than one
  process, no sharding) its reducer's gradient buckets are a second copy (PyTorch's default
  ``gradient_as_bucket_view=False``);
* **optimizer state**: AdamW's two moments, fp32 (8 bytes; 2 with an 8-bit optimizer);
* **teacher**: the whole teacher in the compute dtype (2 bytes in bf16/fp16), on every GPU
  (it is not wrapped for FSDP: each process holds a full copy);
* **FSDP gathered**: under FSDP, the layers gathered for compute (the running one and the
  one prefetched) plus the root unit (embeddings, lm_head), in the compute dtype;
* **activations**: per token and layer, the tensors autograd keeps (see
  :func:`activation_bytes_per_token`); with gradient checkpointing only each layer's input
  plus one layer's full set while it is recomputed;
* **logits**: micro-batch x sequence x vocabulary elements of the student's and the
  teacher's logits and the KL term's float32 copies, log-softmaxes and temporaries (see
  :data:`LOGIT_BYTES`): for a 152k vocabulary this is the largest term after the weights.

Sharding (from ``processes`` or the accelerate config file): DDP replicates everything;
FSDP FULL_SHARD divides weights, gradients and optimizer state by the processes
(HYBRID_SHARD: by the processes of one machine), SHARD_GRAD_OP only gradients and optimizer
state; CPU offload moves all three off the GPU. The result is compared with the GPU's memory
less :data:`GPU_RESERVE_FRACTION` (CUDA context, NCCL buffers, allocator fragmentation).
Every number is a prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgekit.sizing import GB, ModelShape

#: Fraction of a training GPU's memory that is not available to tensors: CUDA context, NCCL
#: buffers, allocator fragmentation (the workstation-h100 profile reserves 4 of 80 GB).
GPU_RESERVE_FRACTION = 0.05
#: Default memory of one training GPU when the recipe names none (an 80 GB A100/H100).
DEFAULT_GPU_MEMORY_GB = 80.0
#: Bytes per logit element during the KL loss, with 16-bit autocast: the student's and the
#: teacher's logits (2 + 2), float32 copies / log-softmaxes of both and the teacher's
#: probabilities (4 x 4), the elementwise product before the sum (4). fp32 adds 4.
LOGIT_BYTES = 24
SHARDINGS = ("none", "full", "grad_op", "hybrid")


@dataclass(frozen=True)
class TrainingSetup:
    """How the distillation runs: processes, sharding, batch, precision, optimizer."""

    processes: int = 1
    #: none (DDP / one process), full (FSDP FULL_SHARD), grad_op (SHARD_GRAD_OP), hybrid
    sharding: str = "none"
    #: processes per machine (HYBRID_SHARD shards within one machine)
    processes_per_machine: int | None = None
    cpu_offload: bool = False
    micro_batch: int = 1
    sequence_length: int = 2048
    gradient_checkpointing: bool = False
    #: bytes of one activation / teacher weight in the compute precision (bf16/fp16: 2, fp32: 4)
    compute_bytes: int = 2
    master_bytes: int = 4
    grad_bytes: int = 4
    optimizer_bytes: int = 8
    #: where the setup was read from, e.g. "processes: 8" or "accelerate config fsdp.yaml"
    source: str = ""

    @property
    def strategy(self) -> str:
        if self.sharding == "none":
            return f"DDP x{self.processes}" if self.processes > 1 else "1 process"
        name = {"full": "FULL_SHARD", "grad_op": "SHARD_GRAD_OP", "hybrid": "HYBRID_SHARD"}[self.sharding]
        return f"FSDP {name} x{self.processes}" + (" + CPU offload" if self.cpu_offload else "")

    @property
    def shard_divisor(self) -> int:
        if self.sharding == "hybrid":
            return self.processes_per_machine or self.processes
        return self.processes if self.sharding != "none" else 1


def activation_bytes_per_token(shape: ModelShape, compute_bytes: int = 2) -> int:
    """Bytes autograd keeps per token of one decoder layer (flash/SDPA attention, so no
    score matrix): attention — normed input, q, k, v, attention output (o_proj's input);
    MLP — normed input, gate, up, silu(gate), their product (down's input); the two RMSNorm
    inputs in float32."""
    h, q, kv, inter = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    attention = h + q + 2 * kv + q
    mlp = h + 4 * inter
    return (attention + mlp) * compute_bytes + 2 * h * 4


def _layer_parameters(shape: ModelShape) -> int:
    return (shape.linear_parameters + shape.bias_parameters) // max(shape.num_layers, 1) + 2 * shape.hidden_size


def distill_memory(student: ModelShape, teacher: ModelShape, setup: TrainingSetup) -> dict[str, float]:
    """Predicted memory per GPU in decimal GB, by component, and ``total``."""
    from edgekit.prune.shapes import total_parameters

    params = total_parameters(student)
    divisor = setup.shard_divisor
    on_gpu = not setup.cpu_offload
    weights = params * setup.master_bytes / (divisor if setup.sharding in ("full", "hybrid") else 1)
    gradients = params * setup.grad_bytes / (divisor if setup.sharding != "none" else 1)
    optimizer = params * setup.optimizer_bytes / (divisor if setup.sharding != "none" else 1)
    if not on_gpu:
        weights = gradients = optimizer = 0.0
    buckets = params * setup.grad_bytes if setup.sharding == "none" and setup.processes > 1 and on_gpu else 0.0
    gathered = 0.0
    if setup.sharding != "none":
        root = student.embedding_parameters
        gathered = (2 * _layer_parameters(student) + root) * setup.compute_bytes
    teacher_bytes = total_parameters(teacher) * setup.compute_bytes
    tokens = setup.micro_batch * setup.sequence_length
    per_layer = activation_bytes_per_token(student, setup.compute_bytes) * tokens
    if setup.gradient_checkpointing:
        activations = student.num_layers * tokens * student.hidden_size * setup.compute_bytes + per_layer
    else:
        activations = student.num_layers * per_layer
    logit_bytes = LOGIT_BYTES + (4 if setup.compute_bytes == 4 else 0)
    logits = tokens * student.vocab_size * logit_bytes
    parts = {"weights": weights, "gradients": gradients, "ddp_buckets": buckets, "optimizer": optimizer, "fsdp_gathered": gathered,
             "teacher": teacher_bytes, "activations": activations, "logits": logits}
    result = {k: v / GB for k, v in parts.items()}
    result["total"] = sum(result.values())
    return result


def usable_gb(gpu_memory_gb: float) -> float:
    return gpu_memory_gb * (1 - GPU_RESERVE_FRACTION)


def fitting_alternatives(student: ModelShape, teacher: ModelShape, setup: TrainingSetup,
                         gpu_memory_gb: float, *, processes: int | None = None) -> list[tuple[str, float]]:
    """Changes that would fit, cheapest first: (what to change, predicted GB per GPU).

    Tried in order: gradient checkpointing, FSDP FULL_SHARD over the same processes (or
    ``processes`` GPUs when one process was asked), each with the micro-batch halved until it
    fits (the global batch kept by raising gradient_accumulation), then an 8-bit optimizer."""
    cap = usable_gb(gpu_memory_gb)
    world = max(setup.processes, processes or 1)
    candidates: list[tuple[str, TrainingSetup]] = []
    base = setup
    if not setup.gradient_checkpointing:
        base = replace(base, gradient_checkpointing=True)
        candidates.append(("gradient_checkpointing: true", base))
    if setup.sharding == "none" and world > 1:
        fsdp = replace(base, sharding="full", processes=world)
        candidates.append((f"FSDP FULL_SHARD over {world} GPUs (accelerate_config with distributed_type: FSDP, "
                           f"fsdp_sharding_strategy: FULL_SHARD, num_processes: {world})", fsdp))
        base = fsdp
    batch = base.micro_batch
    while batch > 1:
        batch //= 2
        factor = setup.micro_batch // batch
        candidates.append((("FSDP FULL_SHARD and " if base.sharding != setup.sharding else "")
                           + f"batch_size {batch} (gradient_accumulation x{factor} keeps the tokens per step)",
                           replace(base, micro_batch=batch)))
    smallest = replace(base, micro_batch=1)
    candidates.append(("an 8-bit optimizer (2 bytes of AdamW state per weight) with the above", replace(smallest, optimizer_bytes=2)))
    fitting = []
    for text, candidate in candidates:
        total = distill_memory(student, teacher, candidate)["total"]
        if total <= cap:
            fitting.append((text, total))
    return fitting


__all__ = ["DEFAULT_GPU_MEMORY_GB", "GPU_RESERVE_FRACTION", "LOGIT_BYTES", "TrainingSetup", "activation_bytes_per_token",
           "distill_memory", "fitting_alternatives", "usable_gb"]
