"""A runtime section for a reasoning model: sampling defaults from generation_config.json and
the ``<think>…</think>`` block returned apart from the answer (docs/runtime.md).

The end-to-end tests use a real tiny bundle whose tokenizer has ``<think>`` / ``</think>`` as
added tokens and whose model is wired to write a known answer: attention and MLP outputs are
zero, so the next token depends on the current one only, and the untied lm_head maps each
token of a chain to the next (margin 80 logits, so sampling at the model's T 0.6 picks it too):

    "?" -> <think> -> "\\n" -> " for" -> " the" -> </think> -> " statement" -> " is" -> EOS

A prompt ending in "<think>\\n" (what R1's chat template writes) gets " for the</think> statement
is" (no opening tag); a prompt ending in "?" gets the whole block, opening tag included.
"""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import pytest
from conftest import compress_tiny_bundle, run_cli

from edgekit.errors import EdgekitError
from edgekit.runtime.reasoning import (CLOSE, CONTENT, OPEN, REASONING, ReasoningParser, prompt_opens_reasoning,
                                       reasoning_enabled, split_reasoning)

R1_GENERATION_CONFIG = (Path(__file__).resolve().parent.parent / "edgekit" / "models" / "published"
                        / "deepseek-ai--DeepSeek-R1-Distill-Qwen-7B" / "generation_config.json")
THINK_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
OPEN_PROMPT = "Which statement iterates?<think>\n"  # ends inside the block, as R1's template leaves it
ASK_PROMPT = "Which statement iterates?"  # the model opens the block itself


# --------------------------------------------------------------------------- the parser


def _stream(text: str, size: int, **kw) -> tuple[str, str, list]:
    parser = ReasoningParser(**kw)
    pieces = []
    for i in range(0, len(text), size):
        pieces += parser.push(text[i:i + size])
    pieces += parser.finish()
    return parser.reasoning, parser.content, pieces


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 1000])
def test_tags_split_across_pieces(size):
    text = "<think>\nLet me count: 2 + 2.\n</think>\n\nIt is 4. A </think> here is answer text."
    reasoning, content, pieces = _stream(text, size)
    assert reasoning == "Let me count: 2 + 2."
    assert content == "It is 4. A </think> here is answer text."
    # the pieces are the two strings in order, reasoning first, no tag text leaking
    assert "".join(p for k, p in pieces if k == REASONING) == reasoning
    assert "".join(p for k, p in pieces if k == CONTENT) == content
    assert [k for k, _ in pieces] == sorted((k for k, _ in pieces), key=lambda k: k != REASONING)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_no_opening_tag_when_the_prompt_opened_the_block(size):
    text = "Okay, the user asks.\n</think>\n\nThe answer."
    assert _stream(text, size, in_reasoning=True)[:2] == ("Okay, the user asks.", "The answer.")
    # without the prompt's opening tag the same text is an answer, tags as written
    assert _stream(text, size)[:2] == ("", text)


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_unterminated_block_is_all_reasoning(size):
    # max_new_tokens reached mid-thought, even mid-tag: all of it is reasoning, the answer is empty
    reasoning, content, _ = _stream("<think>\nStill thinking about it </thi", size)
    assert (reasoning, content) == ("Still thinking about it </thi", "")
    assert split_reasoning("more thoughts", in_reasoning=True) == ("more thoughts", "")


def test_no_tags_and_tags_after_text():
    assert split_reasoning("Just an answer.") == (None, "Just an answer.")
    assert split_reasoning("") == (None, "")
    assert split_reasoning("<thin") == (None, "<thin")  # a tag that never completes is text
    assert split_reasoning("See <think>x</think>") == (None, "See <think>x</think>")  # not at the start: text
    assert split_reasoning("  \n<think>a</think>b<think>c</think>") == ("a", "b<think>c</think>")  # the first block only
    assert split_reasoning("<think></think>\n\nAnswer") == ("", "Answer")  # an empty block is still a block


def test_reset_starts_over_in_the_prompts_state():
    parser = ReasoningParser(in_reasoning=True)
    parser.push("first try</think>answer")
    parser.reset()
    assert parser.push("again ") == [(REASONING, "again")]
    assert parser.finish() == [] and (parser.reasoning, parser.content) == ("again", "")
    with pytest.raises(RuntimeError):
        parser.push("after finish")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|Assistant|><think>\n")
    assert not prompt_opens_reasoning("<think>old</think> next question")
    assert prompt_opens_reasoning("<think>old</think> q <think>")
    assert not prompt_opens_reasoning("plain")
    assert not prompt_opens_reasoning([1, 2, 3])  # token ids: no text to look at


class _Tok:
    def __init__(self, vocab=None, template=None, special=()):
        self.vocab, self.chat_template, self.special = dict(vocab or {}), template, set(special)

    def get_vocab(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=False):
        names = {v: k for k, v in self.vocab.items()}
        return "".join(names[i] for i in ids if not (skip_special_tokens and names[i] in self.special))


def test_reasoning_mode_auto_off_split():
    tags = {OPEN: 5, CLOSE: 6}
    assert reasoning_enabled("auto", _Tok(tags))  # by the vocabulary
    assert reasoning_enabled("auto", _Tok(template="... <think>\n"))  # by the chat template
    assert not reasoning_enabled("auto", _Tok({"a": 1}, template="{{ messages }}"))
    assert not reasoning_enabled("off", _Tok(tags))
    assert reasoning_enabled("split", _Tok({"a": 1}))  # asked for: split on whatever text comes
    dropped = _Tok(tags, special={CLOSE})  # decoding would drop </think>: the split cannot work
    assert not reasoning_enabled("auto", dropped)
    with pytest.raises(EdgekitError, match="special tokens"):
        reasoning_enabled("split", dropped)
    with pytest.raises(EdgekitError, match="unknown reasoning mode"):
        reasoning_enabled("maybe", _Tok(tags))


def test_reasoning_modes_are_the_runtime_settings():
    # reasoning.py stays stdlib-only, so it keeps its own tuple: it must equal the setting's choices
    from edgekit.runtime.config import RuntimeConfig, choices
    from edgekit.runtime.reasoning import MODES

    assert MODES == choices(RuntimeConfig, "reasoning")


# --------------------------------------------------------------------------- sampling defaults


def test_sampling_precedence_recipe_then_generation_config_then_default():
    from edgekit.runtime.config import RuntimeConfig
    from edgekit.runtime.generation_config import read_generation_config, resolve_runtime

    gen = read_generation_config(R1_GENERATION_CONFIG)
    assert gen == {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    recipe = RuntimeConfig.model_validate({"sampling": {"top_p": 0.8}}).model_dump()
    resolved, sources = resolve_runtime(recipe, gen, reasoning_model=True, context_length=8192)
    s = resolved["sampling"]
    assert (s["temperature"], s["top_p"], s["top_k"], s["min_p"], s["repetition_penalty"]) == (0.6, 0.8, 0, 0.0, 1.0)
    assert sources["sampling.temperature"] == "generation_config.json"
    assert sources["sampling.top_p"] == "recipe"
    assert sources["sampling.top_k"] == sources["sampling.repetition_penalty"] == "default"
    assert resolved["max_new_tokens"] == 8192 and "reasoning model" in sources["max_new_tokens"]
    RuntimeConfig.model_validate(resolved)
    # no file: the defaults (greedy, 128 tokens for a model that does not reason)
    resolved, sources = resolve_runtime(RuntimeConfig().model_dump(), {}, reasoning_model=False, context_length=8192)
    assert resolved["sampling"]["temperature"] == 0.0 and resolved["max_new_tokens"] == 128
    assert set(sources.values()) == {"default"}
    # the recipe's max_new_tokens, then the file's
    assert resolve_runtime({"max_new_tokens": 50, "sampling": {}}, {"max_new_tokens": 99}, reasoning_model=True,
                           context_length=4096)[0]["max_new_tokens"] == 50
    assert resolve_runtime({"sampling": {}}, {"max_new_tokens": 99}, reasoning_model=True,
                           context_length=4096)[0]["max_new_tokens"] == 99


@pytest.mark.parametrize("gen, temperature, note", [
    ({"do_sample": False, "temperature": 0.7}, 0.0, "do_sample false"),
    ({"temperature": 0.7}, 0.0, "do_sample unset"),  # transformers' default do_sample is false: greedy
    ({"do_sample": True}, 1.0, "default temperature 1.0"),  # sampling asked, no temperature: transformers' 1.0
    ({"do_sample": True, "temperature": 0.3}, 0.3, None),
])
def test_do_sample_decides_greedy_as_transformers_does(gen, temperature, note):
    from edgekit.runtime.generation_config import resolve_runtime

    resolved, sources = resolve_runtime({"sampling": {}}, gen, reasoning_model=False, context_length=2048)
    assert resolved["sampling"]["temperature"] == temperature
    assert sources["sampling.temperature"].startswith("generation_config.json")
    if note:
        assert note in sources["sampling.temperature"]


@pytest.mark.parametrize("text, key", [
    ('{"do_sample": true, "temperature": NaN}', "non-finite"),
    ('{"temperature": 1e999}', "temperature"),
    ('{"temperature": -1}', "temperature"),
    ('{"temperature": true}', "temperature"),
    ('{"temperature": "0.6"}', "temperature"),
    ('{"temperature": 1e-9}', "temperature"),
    ('{"top_p": 0}', "top_p"),
    ('{"top_p": 1.5}', "top_p"),
    ('{"top_k": -3}', "top_k"),
    ('{"top_k": 2.5}', "top_k"),
    ('{"top_k": 99999999999}', "top_k"),
    ('{"repetition_penalty": 0}', "repetition_penalty"),
    ('{"min_p": 2}', "min_p"),
    ('{"do_sample": "yes"}', "do_sample"),
    ('{"max_new_tokens": 0}', "max_new_tokens"),
    ('{"max_new_tokens": 123456789012}', "max_new_tokens"),
    ('[1, 2]', "not a JSON object"),
    ('{"a": ' * 200 + '1' + '}' * 200, "nested"),
    ('{"temperature": 0.6,', "not valid JSON"),
])
def test_hostile_generation_config_is_refused(tmp_path, text, key):
    from edgekit.runtime.generation_config import read_generation_config

    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(EdgekitError) as info:
        read_generation_config(path)
    assert key in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_oversized_generation_config_is_refused(tmp_path):
    from edgekit.runtime.generation_config import read_generation_config

    path = tmp_path / "generation_config.json"
    path.write_text('{"pad": "' + "x" * (300 << 10) + '"}')
    with pytest.raises(EdgekitError):
        read_generation_config(path)
    assert read_generation_config(tmp_path / "absent.json") == {}
    path.write_text('{"temperature": null, "top_k": 40, "num_beams": 4, "bos_token_id": 1}')  # null = unset; others ignored
    assert read_generation_config(path) == {"top_k": 40}


def test_an_inconsistent_generation_config_is_made_savable():
    """transformers loads temperature without do_sample but refuses to save it; the load stage
    resets what has no effect (greedy either way), so the file reaches the bundle."""
    from transformers import GenerationConfig

    from edgekit.models.checkpoint import savable_generation_config

    class Model:
        generation_config = GenerationConfig(temperature=0.7, top_p=0.9, bos_token_id=1)

    with pytest.raises(ValueError):
        Model.generation_config.validate(strict=True)
    savable_generation_config(Model, where="model")
    Model.generation_config.validate(strict=True)
    assert Model.generation_config.temperature == 1.0 and Model.generation_config.bos_token_id == 1
    sampled = type("M", (), {"generation_config": GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95)})
    savable_generation_config(sampled, where="model")  # consistent: untouched
    assert (sampled.generation_config.temperature, sampled.generation_config.top_p) == (0.6, 0.95)


# --------------------------------------------------------------------------- a thinking bundle


def _build_thinking_model(path: Path, source: Path) -> dict[str, int]:
    """The tiny test model's tokenizer with <think> / </think> added and a chat template that
    opens the block, and a model wired to the chain in the module docstring."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(source)
    tok.add_tokens([OPEN, CLOSE])  # added tokens, not special ones: decoding keeps them (as R1's tokenizer)
    tok.chat_template = THINK_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(name) for name in (OPEN, CLOSE)}
    for word in ("\n", " for", " the", " statement", " is", "?"):
        (ids[word],) = tok.encode(word, add_special_tokens=False)
    chain = ["?", OPEN, "\n", " for", " the", CLOSE, " statement", " is"]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, word in enumerate(chain):  # orthogonal embeddings; RMSNorm makes each 8 * e_i
            model.model.embed_tokens.weight[ids[word]] = torch.nn.functional.one_hot(torch.tensor(i), 64).float()
            following = ids[chain[i + 1]] if i + 1 < len(chain) else config.eos_token_id
            model.lm_head.weight[following, i] = 10.0
    path.mkdir(parents=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    # the published R1 sampling defaults (do_sample, T 0.6, top-p 0.95)
    shutil.copyfile(R1_GENERATION_CONFIG, path / "generation_config.json")
    return ids


@pytest.fixture(scope="module")
def thinking(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("thinking")
    ids = _build_thinking_model(tmp / "model", tiny_model_dir)
    bundle = compress_tiny_bundle(tmp, tmp / "model", extra="context_length: 512\n")
    return bundle, ids


def test_bundle_runtime_json_resolves_from_generation_config(thinking):
    bundle, _ = thinking
    assert json.loads((bundle / "generation_config.json").read_text())["temperature"] == 0.6  # it travelled
    runtime = json.loads((bundle / "runtime.json").read_text())
    assert runtime["sampling"]["temperature"] == 0.6 and runtime["sampling"]["top_p"] == 0.95
    assert runtime["sampling"]["top_k"] == 0 and runtime["sampling"]["repetition_penalty"] == 1.0
    assert runtime["sources"]["sampling.temperature"] == runtime["sources"]["sampling.top_p"] == "generation_config.json"
    assert runtime["sources"]["sampling.top_k"] == "default"
    assert runtime["max_new_tokens"] == 512  # a reasoning model: up to the context's end, not 128
    assert runtime["reasoning"] == "auto" and runtime["sources"]["reasoning"] == "auto: split for this tokenizer"
    from edgekit.runtime.bundle import read_runtime_config

    config = read_runtime_config(bundle)
    assert (config.sampling.temperature, config.sampling.top_p, config.max_new_tokens) == (0.6, 0.95, 512)


def test_runtime_json_with_unset_values_is_completed_at_read(thinking, tmp_path):
    from edgekit.runtime.bundle import read_runtime_config

    bundle, _ = thinking
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "runtime.json").write_text(json.dumps({"sampling": {"top_p": 0.5}}))  # written by hand
    config = read_runtime_config(copy)
    assert (config.sampling.temperature, config.sampling.top_p, config.max_new_tokens) == (0.6, 0.5, 512)
    (copy / "generation_config.json").write_text('{"do_sample": true, "temperature": 1e999}')
    with pytest.raises(EdgekitError, match="temperature"):
        read_runtime_config(copy)


def test_bundle_stage_refuses_a_hostile_generation_config(thinking, tmp_path):
    from edgekit.pack.stage import _runtime_json
    from edgekit.errors import ModelError
    from edgekit.recipe import Recipe

    bundle, _ = thinking
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "generation_config.json").write_text('{"do_sample": true, "top_p": -0.5}')
    recipe = Recipe.model_validate({"name": "x", "model": "m", "target": "t", "stages": ["load"]})
    with pytest.raises(ModelError, match="top_p"):
        _runtime_json(recipe, copy, "edgekit.runtime/1")
    (copy / "generation_config.json").unlink()  # no file: edgekit's defaults, the recipe's values win
    recipe = Recipe.model_validate({"name": "x", "model": "m", "target": "t", "stages": ["load"],
                                    "runtime": {"sampling": {"temperature": 0.2}, "reasoning": "off"}})
    data = _runtime_json(recipe, copy, "edgekit.runtime/1")
    assert data["sampling"]["temperature"] == 0.2 and data["sources"]["sampling.temperature"] == "recipe"
    assert data["max_new_tokens"] == 128 and data["sources"]["reasoning"] == "off: off for this tokenizer"


def test_run_prompt_splits_reasoning(thinking):
    from edgekit import api

    bundle, ids = thinking
    events = []
    result = api.run_prompt(bundle, OPEN_PROMPT, on_event=events.append)
    assert result["tokens"] == [ids[" for"], ids[" the"], ids[CLOSE], ids[" statement"], ids[" is"]]
    assert (result["reasoning"], result["text"]) == ("for the", "statement is")
    streamed = {"reasoning": "", "text": ""}
    for event in events:
        if event.kind in streamed:
            streamed[event.kind] += event.text
    assert streamed == {"reasoning": "for the", "text": "statement is"}
    assert events[-1].kind == "done"
    # the model opens the block itself
    result = api.run_prompt(bundle, ASK_PROMPT)
    assert result["tokens"][0] == ids[OPEN]
    assert (result["reasoning"], result["text"]) == ("for the", "statement is")
    # off: the text as the model wrote it
    result = api.run_prompt(bundle, ASK_PROMPT, reasoning="off")
    assert result["reasoning"] is None and result["text"] == "<think>\n for the</think> statement is"


def test_cli_run_json_and_plain(thinking):
    bundle, _ = thinking
    out = run_cli("run", str(bundle), "--prompt", OPEN_PROMPT, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert (data["reasoning"], data["text"]) == ("for the", "statement is")
    plain = run_cli("run", str(bundle), "--prompt", OPEN_PROMPT, "--stream")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == "statement is"  # stdout: the answer only
    assert "for the" in plain.stderr and "\x1b[" not in plain.stderr  # the thinking on stderr, no colour off a terminal
    off = run_cli("run", str(bundle), "--prompt", OPEN_PROMPT, "--reasoning", "off")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "for the</think> statement is"


# --------------------------------------------------------------------------- serve


@pytest.fixture(scope="module")
def server(thinking):
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    bundle, _ = thinking
    srv = EdgekitServer(bundle, ServeOptions(port=0, access_log=False, max_tokens_limit=64), config=resolve_config(bundle),
                        threads=1)
    srv.start()
    srv.load()
    yield srv
    srv.stop(0)


def _post(server, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _events(data: bytes) -> list:
    lines = [line[len(b"data: "):] for line in data.split(b"\n") if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    return [json.loads(line) for line in lines[:-1]]


MESSAGES = [{"role": "user", "content": "Which statement iterates?"}]


def test_serve_chat_returns_reasoning_content(server):
    status, raw = _post(server, "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 200, raw
    message = json.loads(raw)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "statement is", "reasoning_content": "for the"}
    assert json.loads(raw)["choices"][0]["finish_reason"] == "stop"


def test_serve_chat_stream_has_reasoning_content_deltas(server):
    status, raw = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "stream": True})
    assert status == 200, raw
    deltas = [e["choices"][0]["delta"] for e in _events(raw) if e.get("choices")]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas[1:])
    assert (reasoning, content) == ("for the", "statement is")
    kinds = [("r" if "reasoning_content" in d else "c") for d in deltas[1:] if d]
    assert kinds == sorted(kinds, key=lambda k: k != "r")  # all the reasoning, then the answer
    assert not any(OPEN in d.get("content", "") or CLOSE in d.get("content", "") for d in deltas)


def test_serve_completions_unchanged(server):
    status, raw = _post(server, "/v1/completions", {"prompt": OPEN_PROMPT})
    assert status == 200, raw
    choice = json.loads(raw)["choices"][0]
    assert choice["text"] == " for the</think> statement is" and "reasoning_content" not in choice


def test_serve_off_has_no_reasoning_content(thinking):
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    bundle, _ = thinking
    srv = EdgekitServer(bundle, ServeOptions(port=0, access_log=False, max_tokens_limit=64),
                        config=resolve_config(bundle, reasoning="off"), threads=1)
    srv.start()
    try:
        srv.load()
        status, raw = _post(srv, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0})
        assert status == 200, raw
        message = json.loads(raw)["choices"][0]["message"]
        assert message == {"role": "assistant", "content": " for the</think> statement is"}
    finally:
        srv.stop(0)



def test_serve_lets_a_reasoning_bundle_think_to_its_max_new_tokens(thinking):
    """--max-tokens-limit unset: 512, or the bundle's max_new_tokens when larger (a reasoning
    bundle's is its context), always below the context; an explicit limit wins."""
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions, max_tokens_limit

    assert max_tokens_limit(None, 4096, 4096) == 4095  # R1-like: the whole context
    assert max_tokens_limit(None, 128, 4096) == 512  # an ordinary bundle: 512 as before
    assert max_tokens_limit(64, 4096, 4096) == 64 and max_tokens_limit(10_000, 128, 2048) == 2047
    bundle, _ = thinking
    srv = EdgekitServer(bundle, ServeOptions(port=0, access_log=False), config=resolve_config(bundle, max_new_tokens=300),
                        threads=1)
    srv.start()
    try:
        srv.load()
        assert srv.parser.limits.max_tokens_limit == 511 and srv.parser.default_max_tokens == 300
        status, raw = _post(srv, "/v1/completions", {"prompt": "The for", "max_tokens": 511, "temperature": 0})
        assert status == 200, raw
        status, raw = _post(srv, "/v1/completions", {"prompt": "The for", "max_tokens": 512, "temperature": 0})
        assert status == 400 and b"max_tokens_exceeded" in raw
    finally:
        srv.stop(0)
