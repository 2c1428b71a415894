"""Evaluation that tells the truth: every evaluate stage scores data.source's held-out end
(in_domain) and held-out text from other sources (data.eval_sets; by default ood =
builtin:package-readmes), with top-1 agreement and KL to the teacher; the other sets never
reach calibration or training."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
from conftest import write_recipe

from edgekit import api
from edgekit.errors import EdgekitError
from edgekit.models import text as text_module
from edgekit.models.text import (
    BUILTIN_PACKAGE_READMES, BUILTIN_PYTHON_DOCS, IN_DOMAIN, README_PACKAGES, TextSource, package_readmes,
    package_readmes_fingerprint, recipe_data_fingerprint, recipe_eval_sets_fingerprint, resolve_eval_sets,
    resolve_text_source, spread_windows,
)


def by_name(manifest):
    return {s["name"]: s for s in manifest["stages"]}


# -- the built-in out-of-domain text ------------------------------------------------------------


def test_package_readmes_is_english_prose_from_installed_dependencies():
    readmes = package_readmes()
    names = [name for name, _, _ in readmes]
    assert names == [n for n in README_PACKAGES if n in names]  # the fixed order
    assert {"torch", "transformers", "onnx", "pydantic"} <= set(names)
    text = resolve_text_source(BUILTIN_PACKAGE_READMES).read()
    assert text == "\n".join(prose for _, _, prose in readmes)
    # ≥ 8192 tokens of any large-vocabulary tokenizer (3.5-4.5 characters per token): 29,664 SmolLM2 tokens here
    assert len(text) > 8192 * 5
    assert "```" not in text and "<img" not in text and ">>> " not in text  # code blocks and markup dropped
    assert all(len(prose) <= text_module.README_MAX_CHARS for _, _, prose in readmes)
    # not the Python docs: no paragraph of one is in the other
    docs = resolve_text_source(BUILTIN_PYTHON_DOCS).read()
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200]
    assert paragraphs and not any(p in docs for p in paragraphs)


def test_package_readmes_fingerprint_records_versions_and_hash():
    import hashlib
    import importlib.metadata as metadata

    first, second = package_readmes_fingerprint(), package_readmes_fingerprint()
    assert first == second  # deterministic
    assert first["packages"]["torch"] == metadata.version("torch")
    text = resolve_text_source(BUILTIN_PACKAGE_READMES).read()
    assert first["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert resolve_text_source(BUILTIN_PACKAGE_READMES).fingerprint() == first


def test_readme_prose_drops_code_and_markup_and_caps_length():
    body = "Intro paragraph.\n\n```python\nimport x\n```\n<p align=center>logo</p>\n[![badge](u)](v)\n>>> 1 + 1\n\nMore text."
    assert text_module._readme_prose(body) == "Intro paragraph.\n\nMore text."
    long = "\n\n".join(f"paragraph {i} " + " ".join(["word"] * 200) for i in range(40))
    capped = text_module._readme_prose(long)
    assert len(capped) <= text_module.README_MAX_CHARS and capped.endswith("word") and long.startswith(capped)


def test_spread_windows_are_even_and_never_overlap():
    ids = list(range(1000))
    picked = spread_windows(ids, tokens=300, window=100)
    starts = [picked[i] for i in range(0, len(picked), 100)]
    assert len(picked) == 300 and starts == [0, 450, 900]
    assert picked == [t for s in starts for t in range(s, s + 100)]
    whole = spread_windows(ids, tokens=10_000, window=100)  # asks more than the text: all of it, no overlap
    assert whole == ids
    assert spread_windows(ids, tokens=100, window=100) == list(range(100))
    with pytest.raises(EdgekitError, match="shorter than one window of 100.*data.eval_sets"):
        spread_windows(list(range(99)), tokens=100, window=100)


def test_default_eval_sets():
    sets = resolve_eval_sets({"source": BUILTIN_PYTHON_DOCS, "eval_tokens": 1024})
    assert [(s.label, s.source, s.tokens) for s in sets] == [("ood", BUILTIN_PACKAGE_READMES, 1024)]
    swapped = resolve_eval_sets({"source": BUILTIN_PACKAGE_READMES, "eval_tokens": 512})
    assert [(s.label, s.source) for s in swapped] == [("ood", BUILTIN_PYTHON_DOCS)]
    assert resolve_eval_sets({"source": "x.txt", "eval_tokens": 512, "eval_sets": []}) == []
    explicit = resolve_eval_sets({"source": "x.txt", "eval_tokens": 512,
                                  "eval_sets": [{"label": "news", "source": "n.jsonl", "tokens": 2048, "text_field": "body"}]})
    assert [(s.label, s.source, s.tokens, s.text_field) for s in explicit] == [("news", "n.jsonl", 2048, "body")]


def test_in_domain_label_is_one_name():
    from edgekit import recipe

    assert recipe.IN_DOMAIN == IN_DOMAIN == "in_domain"


# -- recipes ------------------------------------------------------------------------------------


def _recipe_with_sets(tmp_path, model, sets_yaml: str, stages: str | None = None) -> Path:
    path = write_recipe(tmp_path / "r.yaml", model, stages=stages or "stages:\n  - type: load\n  - type: evaluate\n",
                        output=tmp_path / "run")
    text = path.read_text().replace("  window: 128\n", "  window: 128\n" + textwrap.indent(sets_yaml, "  "), 1)
    path.write_text(text)
    return path


@pytest.mark.parametrize("sets_yaml, message", [
    ("eval_sets:\n  - label: in_domain\n    source: builtin:package-readmes\n", r"data\.eval_sets\[0\]\.label.*reserved|reserved.*data\.eval_sets\[0\]\.label"),
    ("eval_sets:\n  - label: a\n    source: builtin:package-readmes\n  - label: a\n    source: o.txt\n", r"label 'a' is used twice"),
    ("eval_sets:\n  - label: a\n    source: hf:org/name\n", r"never downloaded.*data\.eval_sets\[0\]\.source"),
    ("eval_sets:\n  - label: a\n    source: builtin:python-docs\n", r"is data\.source itself"),
    ("eval_sets:\n  - label: a\n    source: builtin:package-readmes\n    tokens: 64\n", r"shorter than one window"),
    ("eval_sets:\n  - label: a\n    source: builtin:package-readmes\n    tokens: 0\n", r"data\.eval_sets\[0\]\.tokens"),
    ("eval_sets:\n  - label: ../up\n    source: builtin:package-readmes\n", r"data\.eval_sets\[0\]\.label"),
    ("eval_sets:\n  - label: a\n    source: builtin:package-readmes\n    weight: 2\n", r"data\.eval_sets\[0\]\.weight"),
    ("eval_sets:\n  - label: a\n    source: \"x\\ty.txt\"\n", r"control characters"),
    ("eval_sets:\n  - label: a\n    source: nothere.jsonl\n", r"does not exist.*data\.eval_sets\[0\]\.source.*builtin:package-readmes"),
    ("eval_sets:\n  - label: a\n    source: builtin:lorem\n", r"unknown built-in text 'builtin:lorem'.*data\.eval_sets\[0\]\.source"),
    ("eval_sets: builtin:package-readmes\n", r"data\.eval_sets"),
    ("eval_sets:\n" + "".join(f"  - label: s{i}\n    source: builtin:package-readmes\n" for i in range(9)), r"data\.eval_sets"),
])
def test_hostile_eval_sets_are_refused_in_one_line(tmp_path, tiny_model_dir, sets_yaml, message):
    import re

    recipe = _recipe_with_sets(tmp_path, tiny_model_dir, sets_yaml)
    with pytest.raises(EdgekitError) as caught:
        api.validate_recipe(recipe)
    shown = str(caught.value)
    assert "\n" not in shown and re.search(message, shown), shown
    assert "resolve" in shown, shown


def test_an_empty_directory_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    recipe = _recipe_with_sets(tmp_path, tiny_model_dir, "eval_sets:\n  - label: a\n    source: empty\n")
    with pytest.raises(EdgekitError, match=r"no \.txt, \.jsonl or \.parquet files.*eval_sets\[0\]\.source"):
        api.validate_recipe(recipe)


def test_eval_sets_enter_only_the_evaluate_cache_key(tmp_path, tiny_model_dir):
    from edgekit.recipe import read_recipe

    (tmp_path / "a.txt").write_text("alpha " * 400)
    (tmp_path / "b.txt").write_text("beta " * 400)
    first = read_recipe(_recipe_with_sets(tmp_path, tiny_model_dir, "eval_sets:\n  - label: x\n    source: a.txt\n"))
    (tmp_path / "r.yaml").unlink()
    second = read_recipe(_recipe_with_sets(tmp_path, tiny_model_dir, "eval_sets:\n  - label: x\n    source: b.txt\n"))
    assert recipe_data_fingerprint(first.recipe, tmp_path) == recipe_data_fingerprint(second.recipe, tmp_path)
    assert recipe_eval_sets_fingerprint(first.recipe, tmp_path) != recipe_eval_sets_fingerprint(second.recipe, tmp_path)
    from edgekit.pipeline.registry import get_stage

    assert "eval_sets" in get_stage("evaluate").uses
    assert all("eval_sets" not in get_stage(kind).uses for kind in ("prune", "distill", "quantize", "load", "export_onnx"))


# -- agreement and KL ----------------------------------------------------------------------------


def test_agreement_and_kl_of_a_copy_and_of_a_perturbed_student(tiny_model_dir):
    import torch

    from edgekit.measure.perplexity import perplexity_torch
    from edgekit.weights.checkpoint import load_checkpoint

    teacher, _ = load_checkpoint(tiny_model_dir, dtype="float32")
    copy, _ = load_checkpoint(tiny_model_dir, dtype="float32")
    ids = [(i * 37) % 380 + 3 for i in range(512)]
    same = perplexity_torch(copy, ids, window=128, teacher=teacher)
    assert same["agreement"] == 1.0 and same["kl"] == 0.0
    assert same["perplexity"] == perplexity_torch(copy, ids, window=128)["perplexity"]  # the teacher changes nothing else
    torch.manual_seed(1)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved = perplexity_torch(copy, ids, window=128, teacher=teacher)
    assert moved["agreement"] < 0.9 and moved["kl"] > 0.01


# -- the pipeline -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sets")
    stages = textwrap.dedent("""\
        stages:
          - type: load
          - type: evaluate
            name: evaluate_float
          - type: load
            name: load_copy
          - type: evaluate
            name: evaluate_copy
          - type: prune
            params: 0.5
            axes: [hidden, mlp]
          - type: evaluate
            name: evaluate_pruned
          - type: export_onnx
          - type: evaluate
            name: evaluate_onnx
        """)
    recipe = write_recipe(tmp / "r.yaml", tiny_model_dir, stages=stages, output=tmp / "run")
    return api.compress(recipe, quiet=True), tmp / "run"


def test_every_evaluate_stage_scores_both_sets(sets_run):
    manifest, out = sets_run
    stages = by_name(manifest)
    readmes = package_readmes_fingerprint()
    for name in ("evaluate_float", "evaluate_copy", "evaluate_pruned", "evaluate_onnx"):
        metrics = stages[name]["metrics"]
        assert list(metrics["sets"]) == [IN_DOMAIN, "ood"]
        in_domain, ood = metrics["sets"][IN_DOMAIN], metrics["sets"]["ood"]
        # the in-domain keys stay where they were
        assert metrics["perplexity"] == in_domain["perplexity"] and metrics["tokens"] == in_domain["tokens"] == 8 * 127
        assert in_domain["source"] == BUILTIN_PYTHON_DOCS
        assert ood["source"] == BUILTIN_PACKAGE_READMES and ood["sha256"] == readmes["sha256"]
        assert ood["packages"] == readmes["packages"] and ood["windows"] == 8 and ood["tokens"] == 8 * 127
        assert ood["perplexity"] > 1 and ood["perplexity"] != in_domain["perplexity"]
        assert json.loads((out / stages[name]["dir"] / "metrics.json").read_text()) == metrics
    float_ = stages["evaluate_float"]["metrics"]
    assert float_["teacher"] == "self" and "agreement" not in float_ and "agreement" not in float_["sets"]["ood"]


def test_a_copy_of_the_teacher_agrees_fully(sets_run):
    metrics = by_name(sets_run[0])["evaluate_copy"]["metrics"]
    assert metrics["teacher"] == "load"
    for label in (IN_DOMAIN, "ood"):
        assert metrics["sets"][label]["agreement"] == 1.0 and metrics["sets"][label]["kl"] == 0.0
    assert metrics["agreement"] == 1.0 and metrics["kl"] == 0.0


def test_a_pruned_student_disagrees_in_pytorch_and_onnx(sets_run):
    stages = by_name(sets_run[0])
    pruned, onnx = stages["evaluate_pruned"]["metrics"], stages["evaluate_onnx"]["metrics"]
    for label in (IN_DOMAIN, "ood"):
        assert pruned["sets"][label]["agreement"] < 1.0 and pruned["sets"][label]["kl"] > 0.0
        # the float export of the pruned model: ONNX Runtime's logits against the PyTorch teacher, same numbers
        assert onnx["sets"][label]["agreement"] == pytest.approx(pruned["sets"][label]["agreement"], abs=2e-3)
        assert onnx["sets"][label]["kl"] == pytest.approx(pruned["sets"][label]["kl"], rel=1e-3, abs=1e-6)
        assert onnx["sets"][label]["perplexity"] == pytest.approx(pruned["sets"][label]["perplexity"], rel=1e-4)
    assert onnx["backend"] == "onnxruntime" and onnx["teacher"] == "load"


def test_the_summary_table_labels_both_sets(sets_run, capsys, monkeypatch):
    from edgekit.cli import _print_run

    monkeypatch.setenv("COLUMNS", "400")  # one line per stage

    _print_run(sets_run[0], None)
    shown = capsys.readouterr().out
    assert "in_domain: perplexity=" in shown and "ood: perplexity=" in shown and "agreement=" in shown


def test_teacher_none_and_named(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: load\n  - type: evaluate\n    teacher: nowhere\n"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    with pytest.raises(EdgekitError, match=r"teacher 'nowhere' is not an earlier stage.*stages\[1\]\.teacher"):
        api.validate_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("teacher: nowhere", "teacher: none\n    max_windows: 2"))
    manifest = api.compress(recipe, quiet=True)
    metrics = by_name(manifest)["evaluate"]["metrics"]
    assert metrics["teacher"] == "none" and metrics["sets"]["ood"]["windows"] == 2


# -- the out-of-domain text never reaches calibration or training --------------------------------


_STAGE_PACKAGES = ("edgekit.prune", "edgekit.distill", "edgekit.quantize", "edgekit.evaluate", "edgekit.export",
                   "edgekit.pack", "edgekit.models.stage")


def _calling_stage() -> str:
    for frame in inspect.stack()[1:]:
        module = frame.frame.f_globals.get("__name__", "")
        for package in _STAGE_PACKAGES:
            if module == package or module.startswith(package + "."):
                return package
    return "outside a stage"


def test_the_ood_text_never_reaches_calibration_or_training(tmp_path, tiny_model_dir, monkeypatch):
    sentinel = tmp_path / "sentinel.jsonl"
    sentinel.write_text("".join(json.dumps({"body": f"zebra quokka sentinel record {i}. " * 8}) + "\n" for i in range(200)))
    reads: list[tuple[str, str]] = []
    tokenized: list[tuple[str, str]] = []
    original_records = TextSource._records

    def spy_records(self, text_field):
        reads.append((self.spec, _calling_stage()))
        return original_records(self, text_field)

    monkeypatch.setattr(TextSource, "_records", spy_records)
    from edgekit.models import calibration

    original_samples = calibration.calibration_samples
    seen_samples = []

    def spy_samples(ids, **kwargs):
        seen_samples.append((_calling_stage(), list(ids)))
        return original_samples(ids, **kwargs)

    monkeypatch.setattr(calibration, "calibration_samples", spy_samples)

    stages = textwrap.dedent("""\
        stages:
          - type: load
          - type: prune
            params: 0.8
            axes: [mlp]
            importance: activation
            calibration_samples: 4
            sequence_length: 128
            width_multiple: 32
          - type: distill
            steps: 2
            batch_size: 1
            sequence_length: 64
            eval_windows: 1
          - type: quantize
            method: gptq
            bits: 4
            group_size: 32
            symmetric: true
            calibration_samples: 4
            sequence_length: 128
          - type: evaluate
        """)
    recipe = _recipe_with_sets(tmp_path, tiny_model_dir, f"eval_sets:\n  - label: zoo\n    source: {sentinel}\n"
                               "    text_field: body\n    tokens: 256\n", stages=stages)
    manifest = api.compress(recipe, quiet=True)
    readers = {}
    for spec, stage in reads:
        readers.setdefault(spec, set()).add(stage)
    assert readers[str(sentinel)] == {"edgekit.evaluate"}  # read, and only by evaluate
    assert {"edgekit.prune", "edgekit.distill", "edgekit.quantize", "edgekit.evaluate"} <= readers[BUILTIN_PYTHON_DOCS]
    # the calibration windows prune and quantize took hold none of the sentinel's tokens
    from edgekit.weights.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    marker = tokenizer(" zebra quokka sentinel", verbose=False)["input_ids"]
    assert {stage for stage, _ in seen_samples} >= {"edgekit.prune", "edgekit.quantize"}
    for _, ids in seen_samples:
        assert not any(ids[i:i + len(marker)] == marker for i in range(len(ids) - len(marker) + 1))
    metrics = by_name(manifest)["evaluate"]["metrics"]
    assert metrics["sets"]["zoo"]["source"] == str(sentinel) and metrics["sets"]["zoo"]["windows"] == 2
    # the distillation run's record of its data: data.source, no evaluation set
    distill_dir = sentinel.parent / "run" / by_name(manifest)["distill"]["dir"]
    record = json.loads((distill_dir / "distill.json").read_text())
    assert "zoo" not in json.dumps(record) and str(sentinel) not in json.dumps(record)

    # changing the evaluation text reruns evaluate only: nothing upstream depended on it
    sentinel.write_text(sentinel.read_text().replace("zebra", "okapi"))
    again = api.compress(recipe, quiet=True)
    assert [s["status"] for s in again["stages"]] == ["cached"] * 4 + ["done"]
