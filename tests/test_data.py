"""Text sources and the fixed held-out split."""

from __future__ import annotations

import json

import pytest

from edgekit.errors import DataError
from edgekit.models.text import resolve_text_source, tokenize_splits


class CharTokenizer:
    """One token per character: enough to test the split arithmetic exactly."""

    def __call__(self, text, verbose=False):
        return {"input_ids": [ord(c) for c in text]}


def test_builtin_python_docs_split_is_fixed_and_disjoint():
    source = resolve_text_source("builtin:python-docs")
    text = source.read()
    assert len(text) > 400_000
    splits = tokenize_splits(text, CharTokenizer(), eval_tokens=8192, window=512)
    ids = [ord(c) for c in text]
    assert splits.evaluation == ids[-8192:]  # always the end of the text
    assert splits.calibration == ids[:-8192]  # calibration only from before it
    assert splits.eval_windows == 16
    assert source.fingerprint()["builtin"] == "builtin:python-docs"


def test_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert resolve_text_source("a.txt", base_dir=tmp_path).read() == "hello world"
    assert resolve_text_source(str(tmp_path / "b.jsonl")).read() == "first\nsecond"
    assert resolve_text_source(str(tmp_path)).read() == "hello world\nfirst\nsecond"
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert resolve_text_source(str(tmp_path / "c.jsonl")).read(text_field="body") == "x"


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_text_source("missing.txt", base_dir=tmp_path)
    with pytest.raises(DataError, match="unknown built-in text"):
        resolve_text_source("builtin:wikitext")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported data file type"):
        resolve_text_source(str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DataError, match=r"line 2"):
        resolve_text_source(str(tmp_path / "bad.jsonl")).read()
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        resolve_text_source(str(tmp_path / "nofield.jsonl")).read()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        resolve_text_source(str(tmp_path / "empty"))


def test_text_shorter_than_one_window():
    with pytest.raises(DataError, match="shorter than one window of 512"):
        tokenize_splits("x" * 100, CharTokenizer(), eval_tokens=8192, window=512)
    # short but at least one window: everything is held out, nothing left to calibrate on
    splits = tokenize_splits("x" * 600, CharTokenizer(), eval_tokens=8192, window=512)
    assert len(splits.evaluation) == 600 and splits.calibration == [] and splits.eval_windows == 1
