"""The runtime's settings: one strict pydantic model each, read by everything that routes.

:class:`RuntimeConfig` is the recipe's ``runtime:`` section and a bundle's ``runtime.json``;
:class:`RouterSettings` is what a :class:`~edgekit.runtime.router.Router` takes and
:class:`SpeculativeSettings` what one speculative decoding run takes. The three share the
field types below (``Policy``, ``DraftTokens``, ...), so a bound or a choice is declared
once; the CLI builds its ``--policy`` choices and numeric ranges from the same fields
(:func:`choices`, :func:`bounds`).

Light on purpose: pydantic and :mod:`edgekit.errors` only (the runtime's start-up and the
CLI import this module).
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit.errors import EdgekitError


class _Strict(BaseModel):
    # Unknown keys are typos; non-finite numbers are never a meaningful setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


PolicyName = Literal["small_only", "large_only", "input_complexity", "cascade", "learned", "speculative", "degrade"]
POLICIES: tuple[str, ...] = get_args(PolicyName)
#: the policies with a threshold that ``edgekit calibrate-router`` fits
CalibratablePolicy = Literal["input_complexity", "cascade", "learned"]
CALIBRATABLE: tuple[str, ...] = get_args(CalibratablePolicy)
Backend = Literal["auto", "onnxruntime", "tensorrt"]
ReasoningMode = Literal["auto", "off", "split"]
DraftGraph = Literal["auto", "off"]
Check = Literal["incremental", "end"]
CHECKS: tuple[str, ...] = get_args(Check)
#: the policies ``degrade`` can protect (speculative is not one: its small branch is a draft graph)
ProtectedPolicy = Literal["large_only", "input_complexity", "cascade", "learned"]


def _known_policy(value: Any) -> Any:
    # the one-line error names the setting for what it is (pydantic would list the literals)
    if isinstance(value, str) and value not in POLICIES:
        raise ValueError(f"unknown routing policy {value!r} (use one of {', '.join(POLICIES)})")
    return value


Policy = Annotated[PolicyName, BeforeValidator(_known_policy)]
MaxNewTokens = Annotated[int, Field(ge=1, le=1_048_576)]
DraftTokens = Annotated[int, Field(ge=1, le=32, description="speculative: most tokens the small branch drafts per round")]
DraftMinConfidence = Annotated[float, Field(
    ge=0, lt=1, description="speculative: end a draft round early when the small branch's probability for its drafted "
    "token is below this (0: always draft draft_tokens); the output does not change, only the speed")]
BranchTimeout = Annotated[float, Field(gt=0, description="a branch slower than this (per request) counts as failed")]


class SamplingConfig(_Strict):
    """How the runtime picks each token (edgekit.runtime.fastpath; order: penalties ->
    temperature -> top-k -> softmax -> top-p -> min-p). temperature, top_k, top_p, min_p and
    repetition_penalty left unset (null) come from the model's generation_config.json when the
    bundle is written, else from the defaults below (edgekit.runtime.generation_config);
    runtime.json records the value used and where it came from."""

    temperature: float | None = Field(None, ge=0, le=1e6, description="0 = greedy (unset: generation_config.json, "
                                      "do_sample false -> 0; else 0)")
    top_k: int | None = Field(None, ge=0, le=2**31 - 1, description="keep the k most likely tokens (0 = all; unset: "
                              "generation_config.json, else 0)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus: the smallest set with this much probability "
                                "(unset: generation_config.json, else 1)")
    min_p: float | None = Field(None, ge=0, le=1, description="drop tokens below min_p x the top probability (unset: "
                                "generation_config.json, else 0)")
    repetition_penalty: float | None = Field(None, gt=0, le=1e6, description="CTRL-style, over the last penalty_last_n "
                                             "tokens (unset: generation_config.json, else 1)")
    frequency_penalty: float = Field(0.0, ge=-1e6, le=1e6, description="OpenAI-style, per occurrence")
    presence_penalty: float = Field(0.0, ge=-1e6, le=1e6, description="OpenAI-style, once per seen token")
    penalty_last_n: int = Field(64, ge=0, description="how many recent tokens the penalties look at")
    seed: int = Field(0, ge=0, description="RNG seed (same seed, same tokens)")


#: the prompt features of policy ``learned`` (edgekit.runtime.learned.prompt_features), in this
#: order: the small branch's per-token NLL of the prompt (mean, quantiles, max, mean over the last
#: quarter), the entropy of its next-token distributions (mean, 0.9 quantile, at the last
#: position), the top probability at the last position, log(1 + tokens), characters per token,
#: and the shares of digits, punctuation, non-ASCII, whitespace and upper-case characters
FEATURE_NAMES: tuple[str, ...] = (
    "nll_mean", "nll_q10", "nll_q50", "nll_q90", "nll_max", "nll_tail", "entropy_mean", "entropy_q90", "entropy_last",
    "top1_last", "log_tokens", "chars_per_token", "digits", "punct", "non_ascii", "spaces", "upper",
)
#: the most hidden units a learned scorer may have (runtime.json is data from elsewhere)
MAX_HIDDEN = 64
_Weight = Annotated[float, Field(ge=-1e6, le=1e6)]
_Vector = Annotated[tuple[_Weight, ...], Field(max_length=max(MAX_HIDDEN, len(FEATURE_NAMES)))]


def _known_feature(value: Any) -> Any:
    if isinstance(value, str) and value not in FEATURE_NAMES:
        raise ValueError(f"unknown feature {value[:40]!r} (use {', '.join(FEATURE_NAMES)})")
    return value


class LearnedScorer(_Strict, frozen=True):
    """Policy ``learned``: the prompt scorer ``edgekit calibrate-router --policy learned`` trains.

    A tiny network (edgekit.runtime.learned) over the prompt features the small branch's prefill
    gives, predicting how much the large branch would gain on the prompt. score = output_weights . tanh(
    hidden_weights x + hidden_bias) + output_bias with x = (features - mean) / scale (no hidden
    layer: output_weights . x + output_bias); the prompt goes large when score > thresholds.learned."""

    features: tuple[Annotated[str, BeforeValidator(_known_feature)], ...] = Field(
        min_length=1, max_length=len(FEATURE_NAMES), description="the input features, in order (names from FEATURE_NAMES)")
    mean: _Vector = Field(description="per feature: subtracted before scaling")
    scale: tuple[Annotated[float, Field(gt=0, le=1e6)], ...] = Field(max_length=len(FEATURE_NAMES),
                                                                     description="per feature: divides after centring")
    hidden_weights: tuple[_Vector, ...] = Field((), max_length=MAX_HIDDEN, description="hidden units x features (empty: linear)")
    hidden_bias: _Vector = Field((), description="per hidden unit")
    output_weights: _Vector = Field(description="per hidden unit (per feature when linear)")
    output_bias: _Weight = Field(0.0, description="added to the output")
    target: str = Field("gain", max_length=200, description="what the score predicts (a record)")

    @model_validator(mode="after")
    def _shapes(self):
        n, hidden = len(self.features), len(self.hidden_weights)
        if len(set(self.features)) != n:
            raise ValueError("learned.features: a feature is named twice")
        if len(self.mean) != n or len(self.scale) != n:
            raise ValueError(f"learned: mean and scale need one value per feature ({n}), got {len(self.mean)} and {len(self.scale)}")
        if any(len(row) != n for row in self.hidden_weights):
            raise ValueError(f"learned.hidden_weights: every row needs {n} values (one per feature)")
        if len(self.hidden_bias) != hidden:
            raise ValueError(f"learned.hidden_bias needs {hidden} values (one per hidden unit), got {len(self.hidden_bias)}")
        if len(self.output_weights) != (hidden or n):
            raise ValueError(f"learned.output_weights needs {hidden or n} values, got {len(self.output_weights)}")
        return self


class Thresholds(_Strict, frozen=True):
    """Routing thresholds. The defaults are placeholders: calibrate them for a target share
    of large calls with ``edgekit.runtime.calibration.calibrate``."""

    complexity: float = Field(3.0, description="input_complexity: large when the prompt's score > complexity (nats/token)")
    length_weight: float = Field(0.0, description="input_complexity: weight of log(1 + prompt tokens) in the score")
    confidence: float = Field(0.2, description="cascade: escalate when the low quantile falls below this")
    quantile: float = Field(0.1, ge=0, le=1, description="cascade: which low quantile of the confidences")
    min_tokens: int = Field(8, ge=1, description="cascade: first decision point (incremental check)")
    check: Check = Field("incremental", description="cascade: decide at every token from min_tokens on, or at the end")
    learned: float = Field(0.0, ge=-1e6, le=1e6, description="learned: large when the scorer's predicted gain > learned")

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown threshold(s) {', '.join(map(str, unknown))} (use only "
                                 f"{', '.join(sorted(cls.model_fields))})")
        return value


class PrefixCacheConfig(_Strict):
    """Prompt-prefix KV reuse in edgekit serve (edgekit.runtime.prefix_cache): a prompt that
    begins with a prefix prefilled before (a system prompt, the chat template header) starts
    from a copy of that prefix's KV cache and prefills only the rest. Exact: keyed by the
    token ids themselves. Not used with policy input_complexity (it scores every prompt row)."""

    max_mb: float = Field(64.0, ge=0, le=1_048_576, description="memory for cached prefixes per local branch, in MiB "
                          "(least recently used evicted first; 0 = off)")
    max_blocks: int = Field(4096, ge=1, le=1_048_576, description="most blocks kept per branch")
    block_tokens: int = Field(32, ge=1, le=4096, description="the cache holds prefixes in blocks of this many tokens "
                              "(a prompt reuses the whole blocks it shares with a cached prefix)")
    min_tokens: int = Field(64, ge=1, le=1_048_576, description="shorter prefixes are not cached or reused")


class DegradeSettings(_Strict):
    """Policy ``degrade`` (edgekit.runtime.load): requests follow ``protects`` until the large
    branch is loaded past the latency budget, then go to the small branch until it recovers. The
    budgets unset here come from the bundle's manifest (budgets.latency_p99_ms, ttft_p99_ms)."""

    protects: ProtectedPolicy = Field("large_only", description="the policy followed while the large branch is within "
                                      "budget: large_only | input_complexity | cascade")
    tpot_p99_ms: float | None = Field(None, gt=0, le=600_000, description="per-token latency budget (p99, ms) of the "
                                      "large branch (unset: the manifest's budgets.latency_p99_ms)")
    ttft_p99_ms: float | None = Field(None, gt=0, le=3_600_000, description="time-to-first-token budget (p99, ms) of "
                                      "the large branch (unset: the manifest's budgets.ttft_p99_ms)")
    max_large_in_flight: int | None = Field(None, ge=1, le=4096, description="most requests on the large branch at once "
                                            "(unset: predicted from the window, assuming the streams share the branch "
                                            "one after another, as an unbatched branch does)")
    window: int = Field(64, ge=1, le=10_000, description="the p99s are over the last this many large-branch answers")
    window_s: float = Field(30.0, gt=0, le=86_400, description="... no older than this many seconds (so that a window "
                            "with no new large answers empties and the policy tries the large branch again)")
    recover: float = Field(0.8, gt=0, lt=1, description="once degraded, back to the large branch only when every signal "
                           "is at most this fraction of its budget (hysteresis: no flapping at the budget)")


class BatchingConfig(_Strict):
    """Batched decoding in edgekit serve (edgekit.runtime.backends.batched): with
    --max-concurrency above 1, the decode steps of the streams on one local branch run as one
    forward pass (continuous batching: streams join and leave between steps); each stream's
    tokens are what it generates alone."""

    max_batch: int = Field(8, ge=1, le=64, description="most streams in one decode step per branch (1 = off: every "
                           "stream runs its own forward passes); streams beyond it decode unbatched")
    max_wait_ms: float = Field(20.0, ge=0, le=100, description="how long a step waits for streams that have not "
                               "submitted their next token yet (one busy sampling, or a thread slow to wake on a loaded "
                               "CPU) before it runs without them; never more than half the recent step time")


class SpeculativeSettings(_Strict):
    """What one speculative decoding run takes (edgekit.runtime.speculative)."""

    max_new_tokens: MaxNewTokens
    draft_tokens: DraftTokens = 4
    draft_min_confidence: DraftMinConfidence = 0.0


class RouterSettings(_Strict):
    """What a Router takes (edgekit.runtime.router.Router): RuntimeConfig's routing fields."""

    policy: Policy = "cascade"
    thresholds: Thresholds = Field(default_factory=Thresholds)
    max_new_tokens: MaxNewTokens = 128
    draft_tokens: DraftTokens = 8
    draft_min_confidence: DraftMinConfidence = 0.5
    timeout_s: BranchTimeout | None = None
    degrade: DegradeSettings = Field(default_factory=DegradeSettings)
    learned: LearnedScorer | None = None


class RuntimeConfig(_Strict):
    """How the bundle answers prompts (``edgekit run``): which branch, and when the large one."""

    policy: Policy = Field("small_only", description=" | ".join(POLICIES))
    large: str | None = Field(
        None, description="the large branch: an OpenAI-compatible endpoint (http(s)://...) or a bundle directory "
        "(relative to the bundle it is written into)")
    backend: Backend = Field(
        "auto", description="auto: the TensorRT engine when it is in the bundle and loads here, else ONNX Runtime")
    max_new_tokens: MaxNewTokens | None = Field(
        None, description="default generation limit (unset: generation_config.json's max_new_tokens, "
        "else the context length for a reasoning model, else 128)")
    reasoning: ReasoningMode = Field(
        "auto", description="a reasoning model's <think>...</think> block: split = returned apart from the answer "
        "(edgekit run --json 'reasoning', serve 'reasoning_content'); off = the text as written; auto = split when the "
        "tokenizer knows the tags (edgekit.runtime.reasoning)")
    draft_tokens: DraftTokens = 8
    draft_min_confidence: DraftMinConfidence = 0.5
    draft_graph: DraftGraph = Field(
        "auto", description="speculative, ONNX Runtime: draft with the bundle's onnxruntime_draft graph (export_onnx "
        "draft_graph: int8 activations, faster, less exact) when it has one (auto), or with its main graph (off)")
    timeout_s: BranchTimeout = 30.0
    spin_wait: bool = Field(
        True, description="ONNX Runtime: worker threads busy-wait between the kernels of a decode step (faster on a "
        "dedicated device); false: they sleep (better on a host whose cores other processes keep busy)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    degrade: DegradeSettings = Field(default_factory=DegradeSettings, description="policy degrade: the policy it "
                                     "protects, the budgets and the load window")
    prefix_cache: PrefixCacheConfig = Field(default_factory=PrefixCacheConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    thresholds: dict[str, float | int | str] = Field(
        default_factory=dict, description="router thresholds (complexity, length_weight, confidence, quantile, "
        "min_tokens, check, learned); edgekit calibrate-router fits them")
    learned: LearnedScorer | None = Field(
        None, description="policy learned: the prompt scorer edgekit calibrate-router --policy learned trains "
        "(docs/routing.md)")

    @field_validator("thresholds")
    @classmethod
    def _thresholds_ok(cls, value: dict) -> dict:
        # stored as written (runtime.json keeps only the thresholds that were set), checked as Thresholds
        try:
            Thresholds.model_validate(dict(value))
        except ValidationError as exc:
            raise ValueError(problem(exc)) from None
        return value

    @model_validator(mode="after")
    def _large_when_needed(self):
        if self.policy != "small_only" and not self.large:
            raise ValueError(f"policy {self.policy} needs a large branch: set runtime.large to a bundle directory or an "
                             "http(s):// endpoint")
        if self.policy == "learned" and self.learned is None:
            raise ValueError("policy learned needs its scorer: run edgekit calibrate-router --policy learned")
        if self.policy == "speculative" and self.large and self.large.startswith(("http://", "https://")):
            raise ValueError("speculative decoding needs the large branch's logits: runtime.large must be a local bundle")
        return self


def problem(exc: ValidationError) -> str:
    """The first error of ``exc`` as one line: ``field.path: what is wrong``."""
    first = exc.errors()[0]
    where = ".".join(map(str, first["loc"]))
    what = first["msg"].removeprefix("Value error, ")
    if first["type"] != "value_error" and "input" in first and not isinstance(first["input"], dict):
        what += f", got {first['input']!r}"
    return f"{where}: {what}" if where else what


_Model = typing.TypeVar("_Model", bound=BaseModel)


def checked(model: type[_Model], where: str, **values: Any) -> _Model:
    """``model`` from keyword arguments (None: the model's default), or a one-line EdgekitError."""
    try:
        return model.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise EdgekitError(problem(exc), where=where, how="fix the value (docs/recipe_reference.md: runtime)") from None


def _constraints(field: Any) -> list[Any]:
    """The field's annotated-types constraints, including those inside ``X | None``."""
    found, stack = list(field.metadata), [field.annotation]
    while stack:
        annotation = stack.pop()
        if typing.get_origin(annotation) is Annotated:
            for item in get_args(annotation)[1:]:
                found += getattr(item, "metadata", [item])
        stack.extend(get_args(annotation))
    return found


def choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The literal values field ``name`` of ``model`` accepts (for a CLI's choice list)."""
    stack, out = [model.model_fields[name].annotation], []
    while stack:
        annotation = stack.pop(0)
        if typing.get_origin(annotation) is Literal:
            out += get_args(annotation)
        elif typing.get_origin(annotation) is Annotated:
            stack.append(get_args(annotation)[0])
        else:
            stack.extend(get_args(annotation))
    return tuple(out)


def is_int(model: type[BaseModel], name: str) -> bool:
    """True when field ``name`` of ``model`` holds an integer (``int``, ``int | None``, ...)."""
    stack = [model.model_fields[name].annotation]
    while stack:
        annotation = stack.pop()
        if annotation is int:
            return True
        stack.extend(get_args(annotation))
    return False


def bounds(model: type[BaseModel], name: str) -> dict[str, float]:
    """Field ``name``'s numeric bounds: a subset of ``ge``, ``gt``, ``le``, ``lt``."""
    out: dict[str, float] = {}
    for item in _constraints(model.model_fields[name]):
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                out[key] = getattr(item, key)
    return out


__all__ = [
    "CALIBRATABLE", "CHECKS", "POLICIES", "Backend", "BatchingConfig", "BranchTimeout", "CalibratablePolicy", "Check", "DegradeSettings",
    "DraftGraph", "ProtectedPolicy",
    "DraftMinConfidence", "DraftTokens", "FEATURE_NAMES", "LearnedScorer", "MAX_HIDDEN", "MaxNewTokens", "Policy", "PolicyName", "PrefixCacheConfig", "ReasoningMode",
    "RouterSettings", "RuntimeConfig", "SamplingConfig", "SpeculativeSettings", "Thresholds", "bounds", "checked",
    "choices", "is_int", "problem",
]
