"""builtin:mixed: several kinds of stdlib text interleaved, deterministic, every kind in the
training part and in the held-out end, the out-of-domain READMEs never in it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgekit.models import mixed
from edgekit.models.mixed import KINDS, mixed_corpus, stdlib_modules
from edgekit.models.text import (BUILTIN_MIXED, BUILTIN_PACKAGE_READMES, check_data_budget, data_record,
                                 estimate_tokens, package_readmes, read_token_splits, resolve_eval_sets,
                                 resolve_text_source)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_mixed_to_orin_nano.yaml"


class OffsetCharTokenizer:
    """One token per character, with offsets (as a fast tokenizer gives them)."""

    def __call__(self, text, verbose=False, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def test_mixed_is_deterministic_and_fingerprinted():
    corpus = mixed_corpus()
    mixed_corpus.cache_clear()
    again = mixed_corpus()
    assert again is not corpus and again.text == corpus.text and again.spans == corpus.spans
    assert corpus.sha256 == hashlib.sha256(corpus.text.encode()).hexdigest()
    # another process (another hash seed, another directory listing order) builds the same text
    code = "from edgekit.models.mixed import mixed_corpus; print(mixed_corpus().sha256)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
    assert other == corpus.sha256
    source = resolve_text_source(BUILTIN_MIXED)
    assert source.read() == corpus.text
    fingerprint = source.fingerprint()
    assert fingerprint["sha256"] == corpus.sha256 and fingerprint["python"] == sys.version.split()[0]
    assert set(fingerprint["parts"]) == set(KINDS)
    assert sum(p["characters"] for p in fingerprint["parts"].values()) == sum(e - s for _, s, e in corpus.spans)
    for part in fingerprint["parts"].values():  # equal shares: complete round-robin cycles
        assert 0.3 < part["share"] < 0.37 and part["chunks"] == len(corpus.spans) // len(KINDS)
    # the spans tile the text (chunks joined by one newline), in round-robin order
    assert [k for k, _, _ in corpus.spans[:6]] == list(KINDS) * 2
    assert all(a[2] + 1 == b[1] for a, b in zip(corpus.spans, corpus.spans[1:])) and corpus.spans[-1][2] == len(corpus.text)
    # the reference is the whole of builtin:python-docs; the other kinds come from stdlib modules
    from pydoc_data import topics

    assert corpus.parts["reference"]["characters"] >= sum(map(len, topics.topics.values())) * 0.99
    assert "def " in corpus.text and "class " in corpus.text


def test_every_kind_in_the_training_part_and_the_held_out_end():
    data = {"source": BUILTIN_MIXED, "eval_tokens": 32_768, "window": 512}  # ≈ the recipe's 8,192 SmolLM2 tokens
    splits = read_token_splits(data, OffsetCharTokenizer())
    text = mixed_corpus().text
    assert splits.evaluation == [ord(c) for c in text[-32_768:]]
    assert len(splits.calibration) == len(text) - 32_768
    for part in ("calibration", "evaluation"):
        shares = splits.parts[part]
        assert set(shares) == set(KINDS)
        assert sum(s["tokens"] for s in shares.values()) == len(getattr(splits, part))
        for kind in KINDS:
            assert shares[kind]["share"] > 0.2, (part, kind, shares)
    # even a small held-out end (a few chunks) holds every kind
    small = read_token_splits({**data, "eval_tokens": 8192}, OffsetCharTokenizer())
    assert all(small.parts["evaluation"][kind]["tokens"] > 0 for kind in KINDS)
    # the stage record: characters of each kind in the text, tokens of each in the part read
    record = data_record(data, splits=splits, part="evaluation")
    assert record["source"] == BUILTIN_MIXED and record["sha256"] == mixed_corpus().sha256
    assert record["parts"]["code"]["evaluation_tokens"] == splits.parts["evaluation"]["code"]["tokens"]
    json.dumps(record)  # goes into the manifest as it is


def test_the_out_of_domain_text_is_never_in_the_mixed_corpus():
    text = mixed_corpus().text
    readmes = package_readmes()
    assert readmes, "no dependency READMEs found: builtin:package-readmes is empty"
    paragraphs = [p.strip() for _, _, prose in readmes for p in re.split(r"\n\s*\n", prose)]
    prose = [p for p in paragraphs if len(p.split()) >= 8]  # sentences, not a lone URL or heading
    assert len(prose) > 100
    found = [p for p in prose if p in text]
    assert not found, found[:3]
    # structurally: only stdlib modules, never installed packages (where the READMEs live)
    modules = stdlib_modules(mixed.stdlib_dir())
    assert modules and not any(set(m.split("/")) & {"site-packages", "dist-packages"} for m in modules)
    # and the default evaluation set of a builtin:mixed recipe is the READMEs
    assert [e.source for e in resolve_eval_sets({"source": BUILTIN_MIXED, "eval_tokens": 8192})] == [BUILTIN_PACKAGE_READMES]


def test_a_third_party_package_under_the_stdlib_is_not_read(tmp_path):
    """A system Python keeps site-packages inside its stdlib folder: nothing there (nor the test
    suite, nor the other folders distributions split out) reaches the text."""
    (tmp_path / "alpha.py").write_text('"""Alpha module docstring with enough words in it."""\n\ndef alpha():\n    return 1\n')
    (tmp_path / "beta.py").write_text('"""Beta module docstring with enough words in it."""\n\nBETA = 2\n')
    for folder in ("site-packages/pkg", "dist-packages/pkg", "test", "idlelib", "pydoc_data"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text('"""SENTINEL out-of-domain text that must never be read."""\nSENTINEL = 1\n')
    assert sorted(stdlib_modules(tmp_path)) == ["alpha.py", "beta.py"]
    corpus = mixed_corpus(str(tmp_path))
    assert "SENTINEL" not in corpus.text
    assert "Alpha module docstring" in corpus.text or "Beta module docstring" in corpus.text
    mixed_corpus.cache_clear()


def test_an_evaluation_set_inside_builtin_mixed_is_refused():
    from pydantic import ValidationError

    from edgekit.recipe import DataConfig

    with pytest.raises(ValidationError, match="is part of data.source 'builtin:mixed'"):
        DataConfig(source=BUILTIN_MIXED, eval_sets=[{"label": "docs", "source": "builtin:python-docs"}])
    with pytest.raises(ValidationError, match="contains data.source 'builtin:python-docs'"):
        DataConfig(source="builtin:python-docs", eval_sets=[{"label": "mix", "source": BUILTIN_MIXED}])
    assert DataConfig(source=BUILTIN_MIXED, eval_sets=[{"label": "ood", "source": BUILTIN_PACKAGE_READMES}])


def test_estimate_and_the_mixed_recipe_validates_offline():
    from edgekit.models.text import _MIXED_TOKENS, MIXED_CHARS_PER_TOKEN
    from edgekit.preflight import load_recipe

    corpus = mixed_corpus()
    expected = _MIXED_TOKENS.get(corpus.sha256, int(len(corpus.text) / MIXED_CHARS_PER_TOKEN))
    assert estimate_tokens(BUILTIN_MIXED) == expected
    assert 300_000 < expected < 450_000  # ≈3.2x builtin:python-docs
    loaded = load_recipe(RECIPE)
    assert not loaded.warnings
    data = loaded.recipe.data
    assert data.source == BUILTIN_MIXED and [(e.label, e.source) for e in data.eval_sets] == [("ood", BUILTIN_PACKAGE_READMES)]
    rows = {r["type"]: r for r in check_data_budget(loaded)}
    assert rows["distill"]["tokens_available"] == expected - 8192
    assert rows["distill"]["passes"] < 0.25  # 61,440 of ≈358k tokens
    # the same stages as the default recipe, on other text
    default = load_recipe(REPO / "recipes" / "smollm2_to_orin_nano.yaml").recipe
    assert [s.model_dump() for s in loaded.recipe.stages] == [s.model_dump() for s in default.stages]


def test_validate_the_mixed_recipe_in_the_cli():
    from conftest import run_cli

    result = run_cli("recipe", "validate", str(RECIPE), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and result.stderr == ""


def test_quantize_and_evaluate_record_the_mixed_data(tmp_path, tiny_model_dir):
    from conftest import write_recipe

    from edgekit import api

    stages = textwrap.dedent("""\
        stages:
          - type: load
          - type: quantize
            method: gptq
            group_size: 32
            symmetric: true
            calibration_samples: 4
            sequence_length: 128
          - type: evaluate
            max_windows: 2
        """)
    recipe = write_recipe(tmp_path / "m.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    # a held-out end of at least one round-robin cycle (3 chunks of 2 kB) holds every kind
    recipe.write_text(recipe.read_text().replace("source: builtin:python-docs", "source: builtin:mixed")
                      .replace("eval_tokens: 1024", "eval_tokens: 8192"))
    manifest = api.compress(recipe, quiet=True)
    stages_out = {s["name"]: s for s in manifest["stages"]}
    calibration = stages_out["quantize"]["metrics"]["calibration_data"]
    assert calibration["source"] == BUILTIN_MIXED and calibration["sha256"] == mixed_corpus().sha256
    assert calibration["tokens"] == 4 * 128
    assert set(calibration["parts"]) == set(KINDS)
    assert all(p["calibration_tokens"] > 0 for p in calibration["parts"].values())
    saved = json.loads((tmp_path / "run" / stages_out["quantize"]["dir"] / "quantization.json").read_text())
    assert saved["calibration_data"] == calibration
    sets = stages_out["evaluate"]["metrics"]["sets"]
    assert sets["in_domain"]["sha256"] == mixed_corpus().sha256
    assert all(p["evaluation_tokens"] > 0 for p in sets["in_domain"]["parts"].values())
    assert sets["ood"]["source"] == BUILTIN_PACKAGE_READMES
