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
    with pytest.raises(DataError, match="no .txt, .jsonl or .parquet"):
        resolve_text_source(str(tmp_path / "empty"))


def test_text_shorter_than_one_window():
    with pytest.raises(DataError, match="shorter than one window of 512"):
        tokenize_splits("x" * 100, CharTokenizer(), eval_tokens=8192, window=512)
    # short but at least one window: everything is held out, nothing left to calibrate on
    splits = tokenize_splits("x" * 600, CharTokenizer(), eval_tokens=8192, window=512)
    assert len(splits.evaluation) == 600 and splits.calibration == [] and splits.eval_windows == 1


# -- parquet, save_to_disk, Hugging Face datasets by id, token budgets (issue #16) -------------

import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from edgekit.models.text import (
    check_data_budget,
    data_budget_rows,
    estimate_tokens,
    read_token_splits,
    resolve_data,
    select_split_files,
)
from edgekit.preflight import load_recipe
from edgekit.recipe import DataConfig


def _records(n: int, prefix: str = "record") -> list[str]:
    return [f"{prefix} {i} " + "lorem ipsum dolor sit amet " * 3 for i in range(n)]


def _write_parquet(path: Path, texts: list, *, row_group_size: int = 64, extra: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"text": texts}
    if extra:
        columns["id"] = list(range(len(texts)))
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _write_saved_dataset(folder: Path, texts: list[str]) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: an Arrow IPC *stream* file + state.json +
    dataset_info.json (the datasets package itself is not installed here)."""
    folder.mkdir(parents=True)
    table = pa.table({"text": texts, "label": [0] * len(texts)})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=16)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_fingerprint": "x", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def test_parquet_file_and_directory(tmp_path):
    texts = _records(300) + [None]  # a null text is no record
    _write_parquet(tmp_path / "d" / "part.parquet", texts)
    source = resolve_text_source(str(tmp_path / "d" / "part.parquet"))
    assert source.kind == "parquet"
    assert source.read() == "\n".join(texts[:-1])
    assert resolve_text_source(str(tmp_path / "d")).read() == "\n".join(texts[:-1])  # a directory of parquet files
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, id\)"):
        source.read(text_field="body")
    with pytest.raises(DataError, match="column 'id' holds int64, not text"):
        source.read(text_field="id")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file"):
        resolve_text_source(str(tmp_path / "bad.parquet")).read()


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    texts = _records(50)
    single = _write_saved_dataset(tmp_path / "single", texts)
    assert resolve_text_source(str(single)).read() == "\n".join(texts)
    whole = tmp_path / "dict"
    _write_saved_dataset(whole / "train", texts)
    _write_saved_dataset(whole / "test", ["held apart"])
    (whole / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert resolve_text_source(str(whole)).read() == "\n".join(texts)  # split: train by default
    assert resolve_text_source(str(whole), split="test").read() == "held apart"
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: train, test\)"):
        resolve_text_source(str(whole), split="validation").read()
    # a state.json naming a file outside its folder is refused where it is read
    (single / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../../etc/passwd"}]}))
    with pytest.raises(DataError, match="data file name in state.json"):
        resolve_text_source(str(single)).read()


def test_real_save_to_disk_when_datasets_is_installed(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets package is optional (pyarrow reads its format)")
    texts = _records(40)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "saved"))
    assert resolve_text_source(str(tmp_path / "saved")).read() == "\n".join(texts)


def test_token_budget_is_respected(tmp_path):
    texts = _records(2000)
    _write_parquet(tmp_path / "big.parquet", texts)
    data = DataConfig(source=str(tmp_path / "big.parquet"), token_budget=3000, eval_tokens=1000, window=100)
    source = resolve_data(data)
    text = source.read()
    assert 3000 * 8 <= len(text) < len("\n".join(texts)) and len(text) == 3000 * 8  # read stops at 8 chars/token
    splits = read_token_splits(data, CharTokenizer())
    assert len(splits.calibration) + len(splits.evaluation) == 3000  # then exactly the budget
    assert splits.evaluation == [ord(c) for c in text[2000:3000]]
    assert estimate_tokens(source) == 3000  # never more than the budget
    # the budget also caps plain text and the built-in text
    assert len(resolve_text_source("builtin:python-docs", token_budget=100).read()) == 800


class _CountingFile:
    """A binary file that counts the bytes read: stands in for a remote (HfFileSystem) file."""

    def __init__(self, path, counter):
        self._handle = open(path, "rb")
        self._counter = counter

    def read(self, size=-1):
        data = self._handle.read(size)
        self._counter["bytes"] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def test_streaming_reads_only_what_the_budget_needs(tmp_path):
    import dataclasses

    path = _write_parquet(tmp_path / "stream.parquet", _records(20_000), row_group_size=500)
    counter = {"bytes": 0}

    class Reader:  # the hub reader's interface: (name, opener) per file of the split
        def files(self):
            return [("org/name/stream.parquet", lambda: _CountingFile(path, counter))]

    source = resolve_text_source("hf:org/name", token_budget=2000, streaming=True)
    source = dataclasses.replace(source, _hub=Reader())
    text = source.read()
    assert len(text) == 2000 * 8 and text.startswith("record 0 ")
    assert 0 < counter["bytes"] < path.stat().st_size / 4  # a few row groups, not the file


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, list[str] | str], readme: str | None = None) -> Path:
    """The layout huggingface-cli download --repo-type dataset leaves in the hub cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("datasets--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, list):
            _write_parquet(snapshot / name, content)
        else:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text(content)
    if readme is not None:
        (snapshot / "README.md").write_text(readme)
    return snapshot


CARD = textwrap.dedent("""\
    ---
    license: odc-by
    configs:
    - config_name: default
      data_files:
      - split: train
        path: data/*/*
    - config_name: sample-10BT
      data_files:
      - split: train
        path: sample/10BT/*
    ---
    # a corpus
    """)


def test_hub_dataset_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _fake_hub_cache(tmp_path / "hub", "org/corpus", {
        "data/CC-1/000.parquet": _records(10, "full"),
        "sample/10BT/000_00000.parquet": _records(30, "sample-a"),
        "sample/10BT/001_00000.parquet": _records(30, "sample-b"),
    }, readme=CARD)
    source = resolve_text_source("hf:org/corpus", subset="sample-10BT", token_budget=100_000)
    text = source.read()
    assert text == "\n".join(_records(30, "sample-a") + _records(30, "sample-b"))  # the subset's files, in order
    assert resolve_text_source("hf:org/corpus", token_budget=100_000).read().startswith("full 0 ")  # the default config
    assert source.fingerprint()["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert estimate_tokens(source) is not None and 0 < estimate_tokens(source) < 100_000
    with pytest.raises(DataError, match=r"no subset 'sample-100BT' \(subsets: default, sample-10BT\)"):
        resolve_text_source("hf:org/corpus", subset="sample-100BT", token_budget=1000).read()
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: train\)"):
        resolve_text_source("hf:org/corpus", split="test", token_budget=1000).read()


def test_hub_dataset_not_cached_is_refused_offline_in_one_line(tmp_path, monkeypatch):
    from edgekit.cli import main  # noqa: F401  (the CLI prints the same one line)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        resolve_text_source("hf:HuggingFaceFW/fineweb-edu", subset="sample-10BT", token_budget=10_000)
    line = caught.value.one_line()
    assert "\n" not in line
    assert "dataset 'HuggingFaceFW/fineweb-edu' is not in the local Hugging Face cache" in line
    assert "HF_DATASETS_OFFLINE" in line
    assert "`huggingface-cli download --repo-type dataset HuggingFaceFW/fineweb-edu` (with --include README.md and " \
           "--include for subset sample-10BT's files" in line
    for bad in ("hf:fineweb-edu", "hf:org/../x", "hf:org/a b", "hf:/etc/passwd"):
        with pytest.raises(DataError):
            resolve_text_source(bad, token_budget=10_000)


def test_split_files_by_convention():
    files = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
             "data/test-00000-of-00001.parquet", ".gitattributes"]
    assert select_split_files(files, readme=None, subset=None, split="train", where="x") == files[1:3]
    assert select_split_files(files, readme=None, subset=None, split="test", where="x") == [files[3]]
    assert select_split_files(["en/train/0.jsonl", "de/train/0.jsonl"], readme=None, subset="de", split="train",
                              where="x") == ["de/train/0.jsonl"]
    assert select_split_files(["corpus.jsonl"], readme=None, subset=None, split="train", where="x") == ["corpus.jsonl"]
    with pytest.raises(DataError, match="no .* files for split 'validation'"):
        select_split_files(files, readme=None, subset=None, split="validation", where="x")


def test_data_config_fields_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs data.token_budget"):
        DataConfig(source="hf:org/name")
    with pytest.raises(ValidationError, match="streaming apply to hf: sources only"):
        DataConfig(source="builtin:python-docs", streaming=True)
    with pytest.raises(ValidationError, match="leaves nothing before the held-out"):
        DataConfig(source="hf:org/name", token_budget=100, eval_tokens=1000, window=100)
    with pytest.raises(ValidationError):
        DataConfig(source="hf:org/name", token_budget=10_000, subset="../x")
    assert DataConfig(source="hf:org/name", token_budget=10_000, subset="sample-10BT", streaming=True).split == "train"


def test_estimate_tokens(tmp_path):
    assert estimate_tokens("builtin:python-docs") == 113_108  # measured with SmolLM2's tokenizer
    (tmp_path / "a.txt").write_text("x" * 4000)
    assert estimate_tokens(str(tmp_path / "a.txt")) == 1000  # bytes / 4
    texts = _records(1000)  # ~100 characters each, distinct (as a real corpus is)
    _write_parquet(tmp_path / "p.parquet", texts, extra=True)
    estimate = estimate_tokens(str(tmp_path / "p.parquet"))
    raw = sum(len(t) for t in texts) / 4
    assert raw <= estimate <= raw * 1.1  # the text column (uncompressed) only, not the id column


# -- what the stages consume against what the text holds ---------------------------------------

def _budget_recipe(tmp_path: Path, *, data: str, stages: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("name: budget\nmodel: smollm2-135m\ntarget: jetson-orin-nano-8gb\n" + textwrap.dedent(data)
                    + "stages:\n  - type: load\n" + textwrap.indent(textwrap.dedent(stages), "  "))
    return path


DISTILL = """\
  - type: prune
    params: 0.67
    calibration_samples: 16
    sequence_length: 512
  - type: distill
    steps: {steps}
    batch_size: 4
    gradient_accumulation: 2
    processes: 2
    sequence_length: 256
"""


def test_distillation_past_the_pass_limit_is_refused_unless_allow_repeat(tmp_path):
    # builtin: 113,108 tokens - 8,192 held out = 104,916; 4 passes = 419,664 tokens = 102 steps of 4x2x2x256
    fits = load_recipe(_budget_recipe(tmp_path, data="data: builtin:python-docs\n", stages=DISTILL.format(steps=100)),
                       check_sources=False)
    rows = check_data_budget(fits)
    assert [(r["stage"], r["tokens_asked"], r["tokens_available"]) for r in rows] == [
        ("prune", 8192, 104_916), ("distill", 409_600, 104_916)]
    assert rows[1]["passes"] == pytest.approx(409_600 / 104_916)
    over = load_recipe(_budget_recipe(tmp_path, data="data: builtin:python-docs\n", stages=DISTILL.format(steps=4000)),
                       check_sources=False)
    with pytest.raises(DataError) as caught:
        check_data_budget(over)
    line = caught.value.one_line()
    assert "distillation consumes 16,384,000 tokens (4000 steps x 4 x 2 accumulation x 2 processes x 256 tokens)" in line
    assert "104,916 tokens before the held-out 8,192: 156.2 passes" in line
    assert "(stage distill)" in line and "r.yaml line" in line
    assert "lower steps to 102" in line and "data.allow_repeat: true" in line
    repeat = load_recipe(_budget_recipe(tmp_path, data="data:\n  source: builtin:python-docs\n  allow_repeat: true\n",
                                        stages=DISTILL.format(steps=4000)), check_sources=False)
    assert check_data_budget(repeat)[1]["passes"] == pytest.approx(156.2, abs=0.05)


def test_calibration_asking_more_than_the_text_is_refused(tmp_path):
    stages = """\
      - type: prune
        params: 0.67
        calibration_samples: 256
        sequence_length: 2048
    """
    loaded = load_recipe(_budget_recipe(tmp_path, data="data: builtin:python-docs\n", stages=stages), check_sources=False)
    assert data_budget_rows(loaded)[0]["problem"]
    with pytest.raises(DataError, match=r"prune asks 524,288 calibration tokens \(256 samples x 2048 tokens\) but "
                                        r"builtin:python-docs has 104,916 tokens .* at most 51 samples of 2048 fit"):
        check_data_budget(loaded)
    # quantize's calibration is checked the same way; rtn reads no data
    stages = """\
      - type: quantize
        method: {method}
        group_size: 64
        calibration_samples: 64
        sequence_length: 2048
    """
    (tmp_path / "small.txt").write_text("word " * 20_000)  # 100 kB: ~25,000 tokens
    data = "data:\n  source: small.txt\n  eval_tokens: 1024\n  window: 128\n"
    with pytest.raises(DataError, match=r"quantize asks 131,072 calibration tokens .* ≈23,976 tokens"):
        check_data_budget(load_recipe(_budget_recipe(tmp_path, data=data, stages=stages.format(method="gptq")),
                                      check_sources=False))
    assert check_data_budget(load_recipe(_budget_recipe(tmp_path, data=data, stages=stages.format(method="rtn")),
                                         check_sources=False)) == []


def test_shipped_recipes_data_budget():
    from edgekit.preflight import check_recipe_sources  # noqa: F401  (validation calls check_data_budget)

    repo = Path(__file__).resolve().parent.parent
    for name in ("smollm2_to_orin_nano.yaml", "smollm2_draft_10l.yaml"):
        rows = check_data_budget(load_recipe(repo / "recipes" / name, check_sources=False))
        distill = [r for r in rows if r["type"] == "distill"][0]
        assert distill["passes"] < 1  # 60 x 4 x 256 = 61,440 of 104,916 tokens


def test_validate_refuses_over_consumption_in_one_line(tmp_path):
    from conftest import run_cli

    path = _budget_recipe(tmp_path, data="data: builtin:python-docs\n", stages=DISTILL.format(steps=4000))
    result = run_cli("recipe", "validate", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "distillation consumes 16,384,000 tokens" in result.stderr


def test_tokenize_to_file_streams_up_to_the_budget(tmp_path):
    import numpy as np

    from edgekit.models.text import tokenize_to_file

    texts = _records(500)
    _write_parquet(tmp_path / "c.parquet", texts)
    whole = "\n".join(texts)
    source = resolve_text_source(str(tmp_path / "c.parquet"))
    count = tokenize_to_file(source, CharTokenizer(), tmp_path / "all.u32", chunk_chars=1000)  # many chunks
    ids = np.memmap(tmp_path / "all.u32", dtype="<u4", mode="r")
    assert count == len(whole) and ids.tolist() == [ord(c) for c in whole]  # chunking changes nothing
    budgeted = resolve_text_source(str(tmp_path / "c.parquet"), token_budget=2345)
    assert tokenize_to_file(budgeted, CharTokenizer(), tmp_path / "b.u32", chunk_chars=1000) == 2345
    assert np.fromfile(tmp_path / "b.u32", dtype="<u4").tolist() == [ord(c) for c in whole[:2345]]


def test_token_file_splits_and_calibration_windows_match_the_list_path(tmp_path):
    from edgekit.models.calibration import calibration_samples
    from edgekit.models.text import token_splits_from_file, tokenize_to_file

    source = resolve_text_source("builtin:python-docs", token_budget=20_000)
    tokenize_to_file(source, CharTokenizer(), tmp_path / "t.u32")
    from_file = token_splits_from_file(tmp_path / "t.u32", eval_tokens=4096, window=512)
    in_memory = tokenize_splits(source.read(), CharTokenizer(), eval_tokens=4096, window=512, token_budget=20_000)
    assert list(from_file.evaluation) == in_memory.evaluation and list(from_file.calibration) == in_memory.calibration
    a = calibration_samples(from_file.calibration, samples=8, sequence_length=256)
    b = calibration_samples(in_memory.calibration, samples=8, sequence_length=256)
    assert len(a) == 8 and all(x.dtype == y.dtype and x.shape == (1, 256) and bool((x == y).all()) for x, y in zip(a, b))


def test_a_large_budget_is_tokenized_once_into_the_cache_and_memory_mapped(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import python_docs_text

    from transformers import AutoTokenizer

    from edgekit.models import text as text_mod

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(python_docs_text()[:60_000])
    data = {"source": str(corpus), "token_budget": 6000, "eval_tokens": 512, "window": 128, "text_field": "text"}
    in_memory = text_mod.read_token_splits(data, tokenizer, cache_dir=tmp_path / "cache")  # under the threshold
    assert not (tmp_path / "cache").exists()
    monkeypatch.setattr(text_mod, "TOKEN_FILE_ABOVE", 1000)
    mapped = text_mod.read_token_splits(data, tokenizer, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache" / "tokens").glob("*.u32"))
    assert len(files) == 1 and not isinstance(mapped.calibration, list)
    assert list(mapped.calibration) == list(in_memory.calibration) and mapped.evaluation == list(in_memory.evaluation)
    stamp = files[0].stat().st_mtime_ns
    again = text_mod.read_token_splits(data, tokenizer, cache_dir=tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == stamp and again.evaluation == mapped.evaluation  # reused, not re-tokenized
    other = text_mod.token_file({**data, "token_budget": 5000}, tokenizer, cache_dir=tmp_path / "cache")
    assert other != files[0]  # another budget is another file
