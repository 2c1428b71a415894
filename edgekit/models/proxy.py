"""The proxy model: a tiny random model of the same architecture family as a real one, built
deterministically (fixed seed) from the real model's config.json alone, read the way
:mod:`edgekit.sizing` reads it (a local directory, a .gguf header, the Hugging Face cache, or
the published config kept in ``edgekit/models/published/``) — no weights, no hub access.

A recipe's model ``proxy:<spec>`` is a model source kind of its own
(:mod:`edgekit.models.source`); ``edgekit compress RECIPE --proxy`` rewrites the recipe to name
it (:mod:`edgekit.proxy_run`), so every stage of a 7B recipe runs in CI in a minute or two.

Pure parts (no torch): :func:`real_model_config`, :func:`width_shift` and
:func:`proxy_model_config` (real config -> proxy config, and the mapping applied). The builder
(:func:`write_proxy_checkpoint`) imports torch/transformers/tokenizers inside. Every rule is
listed in docs/proxy.md; the mapping is recorded in the run manifest (``"proxy"``) and in the
load stage's metrics (so in the bundle's manifest too), so a proxy bundle can never be
mistaken for the real one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgekit.errors import ModelError

PROXY_PREFIX = "proxy:"
PROXY_FORMAT = "edgekit.proxy/1"  # bump when a rule below changes: it is part of the cache key
PROXY_SEED = 0
PROXY_VOCAB = 512  # BPE trained on builtin:python-docs
PROXY_LAYERS = 2
PROXY_MAX_POSITIONS = 2048
# Width rule: divide every width by the largest power of two 2^b (b <= MAX_SHIFT) that keeps,
# for every width the quantizers group along, divisibility by each of these (the quantize
# stage's group sizes, export's fused lm_head group sizes) exactly as at full scale, and the
# prune solver's width step (64 from 512 up) the same; head_dim stays >= MIN_HEAD_DIM.
GROUP_DIVISORS = (16, 32, 64, 128)
PRUNE_STEP, PRUNE_STEP_FROM = 64, 512
MIN_HEAD_DIM = 16
MAX_SHIFT = 8

# Model config keys copied from the real config unchanged (the architecture family); every
# other key the proxy sets itself or drops (weights' provenance, versions, quantization).
_KEEP = (
    "architectures", "model_type", "hidden_act", "attention_bias", "attention_dropout", "mlp_bias", "rms_norm_eps",
    "layer_norm_eps", "initializer_range", "rope_theta", "rope_scaling", "partial_rotary_factor", "tie_word_embeddings",
    "use_sliding_window", "use_mrope", "qkv_bias", "num_attention_heads", "num_key_value_heads", "use_cache",
    "torch_dtype", "dtype", "pretraining_tp",
)
_GGUF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}


def is_proxy_spec(spec: str) -> bool:
    return spec.strip().startswith(PROXY_PREFIX)


def inner_spec(spec: str) -> str:
    inner = spec.strip()[len(PROXY_PREFIX):].strip()
    if not inner or is_proxy_spec(inner):
        raise ModelError(f"model {spec!r} names no model to make a proxy of", where="model",
                         how="write proxy:<model>, e.g. proxy:deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (once)")
    return inner


# --------------------------------------------------------------------------- the real config


def real_model_config(source: Any) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(config.json, generation_config.json or None, where they came from) of a resolved
    (non-proxy) ModelSource, without weights and without network."""
    from edgekit.sizing import read_model_config
    from edgekit.yamlio import load_json_file

    def generation(folder: Path) -> dict[str, Any] | None:
        path = folder / "generation_config.json"
        if not path.is_file():
            return None
        value = load_json_file(path, error_cls=ModelError, what="generation_config.json", max_bytes=1 << 16)
        return value if isinstance(value, dict) else None

    if source.is_gguf:
        from edgekit.sizing import read_gguf_header, shape_from_gguf

        shape = shape_from_gguf(source.path)
        meta, _ = read_gguf_header(source.path)
        arch = str(meta.get("general.architecture", ""))
        if arch not in _GGUF_MODEL_TYPES:
            raise ModelError(f"no proxy for GGUF architecture '{arch}'", where=str(source.path),
                             how=f"proxies are built for {', '.join(sorted(_GGUF_MODEL_TYPES))} GGUF files, or any "
                             "Hugging Face checkpoint directory")
        config = {
            "architectures": [_GGUF_MODEL_TYPES[arch]], "model_type": arch, "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
            "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "vocab_size": shape.vocab_size, "tie_word_embeddings": shape.tie_word_embeddings,
        }
        theta = meta.get(f"{arch}.rope.freq_base")
        if isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0:
            config["rope_theta"] = float(theta)
        return config, None, str(source.path)
    if source.kind == "dir":
        return read_model_config(source.path / "config.json"), generation(source.path), str(source.path)
    # a hub id: the Hugging Face cache when it holds the config, else the published copy
    from edgekit.sizing import locate_config

    found = locate_config(source)
    if found is not None:
        path, origin = found
        return read_model_config(path), generation(path.parent), origin
    raise ModelError(
        f"no config.json for {source.spec!r} here (not in the Hugging Face cache, not among edgekit's published configs)",
        where="model",
        how=f"fetch it once (`huggingface-cli download {source.spec} config.json generation_config.json`) or point "
        "'model' at a local checkpoint directory",
    )


# --------------------------------------------------------------------------- config -> proxy config


def _valuation(value: int) -> int:
    return (value & -value).bit_length() - 1


def prune_step(width: int) -> int:
    """The prune solver's width granularity for a width (edgekit.prune.shapes._size_choices)."""
    for step in (PRUNE_STEP, 8):
        if width % step == 0 and width >= 8 * step:
            return step
    return 1


def width_shift(config: dict[str, Any]) -> int:
    """b such that dividing the widths by 2^b keeps their divisibility by every group size in
    :data:`GROUP_DIVISORS`, the prune solver's width step and head_dim >= MIN_HEAD_DIM."""
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    widths = (hidden, inter, heads * head_dim)
    best = 0
    for shift in range(1, MAX_SHIFT + 1):
        f = 1 << shift
        if any(w % f for w in (*widths, head_dim)) or head_dim // f < MIN_HEAD_DIM or (head_dim // f) % 2:
            break
        scaled = [w // f for w in widths]
        if any((w % d == 0) != (s % d == 0) for w, s in zip(widths, scaled) for d in GROUP_DIVISORS):
            break
        if any(prune_step(w) != prune_step(s) for w, s in zip(widths, scaled)):
            break
        best = shift
    return best


def proxy_model_config(config: dict[str, Any], *, vocab_size: int = PROXY_VOCAB, bos: int | None = None,
                       eos: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(proxy config, mapping): the real config scaled down by the rules of this module.

    Kept: architecture, activation, norms, biases (Qwen2's qkv bias is its architecture's
    default), rope settings, head counts (so the GQA ratio and every head layout the pruner
    may choose), untied or tied embeddings. Scaled: widths by 2^width_shift, layers to
    PROXY_LAYERS, vocabulary to the proxy tokenizer's, max_position_embeddings capped."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise ModelError(f"model config.json has no integer '{key}': no proxy can be built from it",
                             where="model", how="give the config.json of a Llama/Qwen2/Mistral-style decoder")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shift = width_shift(config)
    f = 1 << shift
    proxy = {key: config[key] for key in _KEEP if key in config}
    layers = min(config["num_hidden_layers"], PROXY_LAYERS)
    positions = min(config.get("max_position_embeddings") or PROXY_MAX_POSITIONS, PROXY_MAX_POSITIONS)
    proxy.update(
        hidden_size=hidden // f,
        intermediate_size=config["intermediate_size"] // f,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=positions,
    )
    proxy.setdefault("num_key_value_heads", heads)
    if config.get("head_dim"):
        proxy["head_dim"] = head_dim // f
    if "sliding_window" in config and config["sliding_window"] is not None:
        proxy["sliding_window"] = min(config["sliding_window"], positions)
    if "max_window_layers" in config:
        proxy["max_window_layers"] = min(config["max_window_layers"], layers)
    if bos is not None:
        proxy["bos_token_id"] = bos
    if eos is not None:
        proxy["eos_token_id"] = eos
    mapping = []
    for key in ("hidden_size", "intermediate_size", "head_dim", "num_hidden_layers", "vocab_size",
                "max_position_embeddings", "sliding_window", "max_window_layers"):
        before = head_dim if key == "head_dim" else config.get(key)
        after = proxy.get(key, head_dim // f if key == "head_dim" else None)
        if before is not None and before != after:
            rule = {"hidden_size": f"/ 2^{shift}", "intermediate_size": f"/ 2^{shift}", "head_dim": f"/ 2^{shift}",
                    "num_hidden_layers": f"<= {PROXY_LAYERS}", "max_window_layers": f"<= {PROXY_LAYERS}",
                    "vocab_size": "the proxy BPE tokenizer's",
                    }.get(key, f"<= {PROXY_MAX_POSITIONS}")
            mapping.append({"field": f"config.{key}", "from": before, "to": after, "rule": rule})
    return proxy, mapping


# --------------------------------------------------------------------------- the proxy model


def proxy_fingerprint(source: Any) -> dict[str, Any]:
    """What identifies the proxy's weights (for cache keys): the rules' version, the seed and
    the proxy config (which is a function of the real config)."""
    config, generation, _ = real_model_config(source.inner)
    proxy, _ = proxy_model_config(config)
    return {"proxy": PROXY_FORMAT, "seed": PROXY_SEED, "vocab": PROXY_VOCAB, "config": proxy,
            "generation": _sampling(generation), "of": source.inner.fingerprint()}


def proxy_source_config(source: Any) -> dict[str, Any]:
    """The config.json the load stage writes for a ``proxy:`` ModelSource (shape fields exact;
    vocabulary PROXY_VOCAB): what :mod:`edgekit.sizing` reads for a proxy's shape."""
    config, _, _ = real_model_config(source.inner)
    return proxy_model_config(config)[0]


def _sampling(generation: dict[str, Any] | None) -> dict[str, Any]:
    keep = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: generation[k] for k in keep if generation and k in generation}


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
ADDED_TOKENS = ["<think>", "</think>"]  # plain added tokens, as reasoning models have them
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def proxy_tokenizer() -> Any:
    """A byte-level BPE of PROXY_VOCAB tokens trained on the stdlib's docs (deterministic)."""
    from pydoc_data import topics
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=PROXY_VOCAB - len(ADDED_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tokenizer.train_from_iterator(["\n".join(topics.topics.values())[:200_000]], trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_proxy_checkpoint(source: Any, out_dir: Path, *, dtype: str) -> dict[str, Any]:
    """Build the proxy model (seeded) + tokenizer into ``out_dir`` as a standard Hugging Face
    checkpoint; returns what the load stage records about it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from edgekit.weights.hf import quiet_transformers, torch_dtype

    quiet_transformers()
    config, generation, origin = real_model_config(source.inner)
    tokenizer = proxy_tokenizer()
    vocab = len(tokenizer)
    proxy, mapping = proxy_model_config(config, vocab_size=vocab, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    fields = {k: v for k, v in proxy.items() if k not in ("model_type", "architectures", "torch_dtype", "dtype")}
    try:
        hf_config = AutoConfig.for_model(proxy["model_type"], **fields)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"transformers cannot build a '{proxy.get('model_type')}' model: {exc}", where=origin,
                         how="proxies need an architecture transformers ships (llama, qwen2, mistral, ...)") from None
    hf_config.architectures = proxy.get("architectures")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(PROXY_SEED)
    try:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype))
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    sampling = _sampling(generation)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               **sampling)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "proxy": True,
        "proxy_of": source.inner.spec,
        "proxy_config_from": origin,
        "proxy_seed": PROXY_SEED,
        "proxy_mapping": mapping,
        **({"proxy_sampling": sampling} if sampling else {}),
    }
