"""Proxy runs: the same recipe, with the model replaced by a tiny random model of the same
architecture family, so that every stage of a 7B recipe runs in CI in a minute or two.

``edgekit compress RECIPE --proxy`` (``api.compress(..., proxy=True)``) rewrites the recipe
with :func:`proxy_recipe` and runs it into its own output directory (``runs/<name>-proxy``).
The model becomes ``proxy:<spec>``, a model source kind of its own: the load stage builds the
proxy deterministically (fixed seed) from the *real* model's config.json, read the way
:mod:`edgekit.sizing` reads it (a local directory, a .gguf header, the Hugging Face cache, or
the published config kept in ``edgekit/models/published/``) — no weights, no hub access.

Pure parts (no torch): :func:`proxy_model_config` (real config -> proxy config, and the
mapping applied), :func:`proxy_recipe` (recipe -> proxied recipe, and its mapping). The
builder (:func:`write_proxy_checkpoint`) imports torch/transformers/tokenizers inside.
Every rule is listed in docs/proxy.md; the mapping is recorded in the run manifest
(``"proxy"``) and in the load stage's metrics (so in the bundle's manifest too), so a proxy
bundle can never be mistaken for the real one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgekit.errors import ModelError, OutputError, RecipeError
from edgekit.recipe import LoadedRecipe

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
# Stage parameters: capped (by field name, in any stage that has the field) so the whole run
# takes a minute or two on 2 CPU cores.
FIELD_CAPS = {
    "calibration_samples": 4,   # prune, quantize
    "sequence_length": 128,     # prune, distill, quantize
    "steps": 4,                 # distill
    "batch_size": 2,            # distill
    "gradient_accumulation": 2,  # distill
    "warmup_steps": 1,          # distill
    "checkpoint_every": 2,      # distill: a resumable checkpoint is written during the run
    "eval_every": 2,            # distill
    "eval_windows": 2,          # distill
    "max_windows": 4,           # evaluate
}
FIELD_CLEARED = ("max_minutes",)  # distill: a time limit would make the proxy step-irreproducible
DATA_EVAL_TOKENS = 1024
DATA_WINDOW = 128
PROXY_DATA = "builtin:python-docs"
SUFFIX = "-proxy"

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
    from edgekit.models.source import read_model_config
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


def _prune_step(width: int) -> int:
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
        if any(_prune_step(w) != _prune_step(s) for w, s in zip(widths, scaled)):
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


# --------------------------------------------------------------------------- recipe -> proxied recipe


def proxy_name(name: str) -> str:
    return name[: 128 - len(SUFFIX)] + SUFFIX


def proxy_recipe(recipe: Any, *, width_factor: int, real_layers: int, processes: int = 2) -> tuple[Any, list[dict[str, Any]]]:
    """(proxied Recipe, mapping): the same stages with the model, data and the parameters that
    set the run's cost replaced (pure; see docs/proxy.md for each rule)."""
    from edgekit.recipe import Recipe

    data = recipe.to_dict()
    mapping: list[dict[str, Any]] = []

    def change(container: dict[str, Any], key: str, value: Any, where: str, rule: str) -> None:
        if container.get(key) != value:
            mapping.append({"field": where, "from": container.get(key), "to": value, "rule": rule})
            container[key] = value

    change(data, "name", proxy_name(data["name"]), "name", "+ '-proxy': its own output directory and bundle name")
    change(data, "model", PROXY_PREFIX + inner_spec(PROXY_PREFIX + data["model"]), "model",
           "a random model of the same family built from the real config (load stage)")
    if data.get("output"):
        change(data, "output", data["output"].rstrip("/") + SUFFIX, "output", "+ '-proxy'")
    context = min(data["context_length"], PROXY_MAX_POSITIONS)
    change(data, "context_length", context, "context_length", f"<= {PROXY_MAX_POSITIONS} (max_position_embeddings cap)")
    old_data = data["data"]
    eval_tokens = min(old_data.get("eval_tokens", DATA_EVAL_TOKENS), DATA_EVAL_TOKENS)
    new_data = {"source": PROXY_DATA, "eval_tokens": eval_tokens,
                "window": min(old_data.get("window", DATA_WINDOW), DATA_WINDOW, eval_tokens)}
    from edgekit.recipe import DataConfig

    if "allow_repeat" in DataConfig.model_fields:
        new_data["allow_repeat"] = True
    for key in sorted(set(old_data) | set(new_data)):
        field = DataConfig.model_fields.get(key)
        after = new_data.get(key, field.get_default(call_default_factory=True) if field is not None else None)
        if old_data.get(key) != after:
            mapping.append({"field": f"data.{key}", "from": old_data.get(key), "to": after,
                            "rule": "local text (builtin:python-docs); other data settings at their defaults"})
    data["data"] = new_data
    runtime = data.get("runtime") or {}
    if isinstance(runtime.get("max_new_tokens"), int) and runtime["max_new_tokens"] > context // 2:
        change(runtime, "max_new_tokens", context // 2, "runtime.max_new_tokens", "<= half the proxy's context")
    for index, stage in enumerate(data["stages"]):
        kind = stage["type"]
        where = f"stages[{index}]"
        for key, cap in FIELD_CAPS.items():
            if isinstance(stage.get(key), int) and not isinstance(stage[key], bool) and stage[key] > cap:
                change(stage, key, cap, f"{where}.{key}", f"<= {cap}")
        for key in FIELD_CLEARED:
            if stage.get(key) is not None:
                change(stage, key, None, f"{where}.{key}", "cleared")
        if stage.get("device") == "cuda":
            change(stage, "device", "auto", f"{where}.device", "cuda -> auto (the proxy runs where CI runs)")
        if kind == "distill":
            if stage.get("accelerate_config") or stage.get("processes", 1) > 1:
                change(stage, "accelerate_config", None, f"{where}.accelerate_config",
                       f"-> {processes}-process DDP (gloo on CPU)")
                change(stage, "processes", processes, f"{where}.processes", f"{processes} processes")
        if kind == "prune":
            multiple = stage.get("width_multiple")
            if isinstance(multiple, int) and multiple > max(GROUP_DIVISORS):
                change(stage, "width_multiple", max(max(GROUP_DIVISORS), multiple // width_factor),
                       f"{where}.width_multiple", f"/ {width_factor}, at least {max(GROUP_DIVISORS)}")
            for key in ("hidden_size", "intermediate_size"):
                if isinstance(stage.get(key), int):
                    change(stage, key, max(1, stage[key] // width_factor), f"{where}.{key}", f"/ {width_factor}")
            if isinstance(stage.get("num_layers"), int):
                layers = min(real_layers, PROXY_LAYERS)
                scaled = max(1, min(layers, math.ceil(stage["num_layers"] * layers / real_layers)))
                if stage["num_layers"] < real_layers:
                    scaled = min(scaled, max(1, layers - 1))
                change(stage, "num_layers", scaled, f"{where}.num_layers", "scaled to the proxy's layers")
        if kind == "bundle" and stage.get("name") and stage.get("name") != recipe.name:
            change(stage, "name", proxy_name(stage["name"]), f"{where}.name", "+ '-proxy'")
        if kind == "build_engine":
            if isinstance(stage.get("max_prefill"), int) and stage["max_prefill"] > context:
                change(stage, "max_prefill", context, f"{where}.max_prefill", "<= the proxy's context")
            if isinstance(stage.get("opt_prefill"), int) and stage["opt_prefill"] > stage.get("max_prefill", context):
                change(stage, "opt_prefill", stage["max_prefill"], f"{where}.opt_prefill", "<= max_prefill")
    try:
        return Recipe.model_validate(data), mapping
    except Exception as exc:  # a rule above produced an invalid recipe: a bug in the proxy, said plainly
        raise RecipeError(f"the proxied recipe is invalid: {str(exc).splitlines()[0]}", where="--proxy",
                          how="report it; meanwhile run the proxy on a copy of the recipe") from None


class ProxyLoadedRecipe(LoadedRecipe):
    """A LoadedRecipe whose recipe is the proxied one; ``proxy`` goes into the run manifest,
    and every place an error names says so."""

    def __init__(self, loaded: LoadedRecipe, recipe: Any, proxy: dict[str, Any]):
        super().__init__(recipe, loaded.path, loaded.lines, list(loaded.warnings))
        self.proxy = proxy

    def where(self, *loc: str | int) -> str:
        return super().where(*loc) + " (--proxy)"


def proxy_loaded_recipe(loaded: Any, *, processes: int = 2) -> ProxyLoadedRecipe:
    """The proxied version of a parsed recipe, with the full mapping (model and recipe)."""
    from edgekit.models.source import resolve_model_source

    recipe = loaded.recipe
    if is_proxy_spec(recipe.model):
        raise RecipeError("the recipe's model is already a proxy", where=loaded.where("model"),
                          how="run it without --proxy, or name the real model in the recipe")
    try:
        source = resolve_model_source(recipe.model, revision=recipe.revision, base_dir=loaded.base_dir)
        config, _, origin = real_model_config(source)
    except ModelError as exc:
        raise ModelError(exc.what, where=loaded.where("model"), how=exc.how) from None
    factor = 1 << width_shift(config)
    proxied, recipe_mapping = proxy_recipe(recipe, width_factor=factor, real_layers=config["num_hidden_layers"],
                                           processes=processes)
    _, model_mapping = proxy_model_config(config)
    record = {
        "format": PROXY_FORMAT,
        "proxy": True,
        "of": {"recipe": recipe.name, "model": recipe.model, "config_from": origin},
        "seed": PROXY_SEED,
        "width_factor": factor,
        "model": model_mapping,
        "recipe": recipe_mapping,
    }
    return ProxyLoadedRecipe(loaded, proxied, record)


def proxy_processes() -> int:
    """Distillation processes of a proxy run: 2 (DDP over gloo) on the CPU; on a CUDA host one
    per GPU, at most 2 (a 1-GPU check host trains in one process)."""
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, min(2, torch.cuda.device_count()))
    except ImportError:
        pass
    return 2


def check_output_kind(out: Path, *, proxy: bool) -> None:
    """Refuse to write a proxy run over a real run's directory, and the other way round."""
    manifest = Path(out) / "manifest.json"
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text()).get("proxy")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # the runner deals with an unreadable manifest (it rewrites it)
    if bool(recorded) != proxy:
        kind, other = ("a proxy", "real") if proxy else ("a real", "proxy")
        raise OutputError(f"this directory holds a {other} run; {kind} run must not write over it", where=str(out),
                          how="use another --output (proxy runs default to runs/<name>-proxy)")


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
