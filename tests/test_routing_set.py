"""The routing prompt set (edgekit.models.routing_set): builtin:routing-mixed is big enough, mixed,
deterministic, split into disjoint halves and free of the small branch's training text; prompt set
files are read line by line with hostile lines refused as one-line errors naming file:line."""

from __future__ import annotations

import json

import pytest

from edgekit.errors import DataError
from edgekit.models import routing_set as RS


@pytest.fixture(scope="module")
def built():
    return RS.build_routing_set()


def test_the_builtin_set_is_mixed_traffic_in_two_disjoint_halves(built):
    items, fingerprint = built
    kinds = {i.kind for i in items}
    assert len(items) >= 400 and len(kinds) >= 5, fingerprint["kinds"]
    assert {"prose", "code", "csv", "json", "arithmetic", "short", "long"} <= kinds
    assert fingerprint["prompts"] == len(items) and len(fingerprint["sha256"]) == 64
    calibration = [i for i in items if i.split == "calibration"]
    evaluation = [i for i in items if i.split == "evaluation"]
    assert len(calibration) + len(evaluation) == len(items)
    assert not {i.prompt for i in calibration} & {i.prompt for i in evaluation}
    for kind in kinds:  # stratified: each kind in both halves, about evenly
        a = sum(i.kind == kind for i in calibration)
        b = sum(i.kind == kind for i in evaluation)
        assert a >= 2 and b >= 2 and abs(a - b) <= 1, (kind, a, b)
    assert all(i.continuation and i.continuation.strip() for i in items)
    lengths = sorted(len(i.prompt) for i in items)  # very short and long prompts both
    assert lengths[0] < 40 and lengths[-1] > 1000
    assert len({i.prompt for i in items}) == len(items)


def test_the_builtin_set_is_deterministic_and_free_of_the_training_text(built):
    from conftest import python_docs_text

    items, fingerprint = built
    again, fingerprint_again = RS.build_routing_set()
    assert again == items and fingerprint_again == fingerprint
    topics = python_docs_text()  # the default small branch's calibration and distillation text
    assert not [i.prompt for i in items if len(i.prompt) >= 12 and i.prompt in topics]
    # the halves by hash agree with split_halves on the items without their split
    bare = [RS.PromptItem(i.prompt, i.kind, i.continuation) for i in items]
    cal, ev = RS.split_halves(bare)
    assert {i.prompt for i in cal} == {i.prompt for i in items if i.split == "calibration"}
    assert {i.prompt for i in ev} == {i.prompt for i in items if i.split == "evaluation"}


def test_a_prompt_set_round_trips_through_jsonl(built, tmp_path):
    items, _ = built
    path = RS.write_prompt_set(tmp_path / "set.jsonl", items[:50])
    assert RS.read_prompt_set(path) == items[:50]
    loaded, record = RS.load_prompt_set(path)
    assert loaded == items[:50] and record["prompts"] == 50 and len(record["sha256"]) == 64
    assert not list(tmp_path.glob(".*.tmp"))
    minimal = tmp_path / "minimal.jsonl"
    minimal.write_text('{"prompt": "hello"}\n\n{"prompt": "2 + 2 = ", "kind": "arithmetic"}\n')
    got = RS.read_prompt_set(minimal)
    assert got == [RS.PromptItem("hello"), RS.PromptItem("2 + 2 = ", "arithmetic")]


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ("[1, 2]", "not an object"),
    ('"a string"', "not an object"),
    ('{"kind": "code"}', "'prompt' is missing"),
    ('{"prompt": ""}', "'prompt' is missing"),
    ('{"prompt": "   "}', "'prompt' is missing"),
    ('{"prompt": 5}', "'prompt' is missing"),
    ('{"prompt": "a\\u0000b"}', "NUL"),
    ('{"prompt": "a", "kind": "../../etc"}', "'kind' must be"),
    ('{"prompt": "a", "kind": "Code"}', "'kind' must be"),
    ('{"prompt": "a", "kind": 3}', "'kind' must be"),
    ('{"prompt": "a", "split": "train"}', "'split' must be"),
    ('{"prompt": "a", "continuation": 7}', "'continuation' must be"),
    ('{"prompt": "a", "promt": "typo"}', "unknown field"),
    (json.dumps({"prompt": "x" * (RS.MAX_PROMPT_CHARS + 1)}), "characters"),
])
def test_hostile_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        RS.read_prompt_set(path)
    text = str(info.value)
    assert f"{path}:2" in text and "\n" not in text


def test_hostile_files_are_bounded(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such prompt set"):
        RS.read_prompt_set(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no prompts"):
        RS.read_prompt_set(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"not UTF-8 \(.*binary.jsonl:1\)"):
        RS.read_prompt_set(binary)
    monkeypatch.setattr(RS, "MAX_LINE_BYTES", 64)
    long_line = tmp_path / "long.jsonl"
    long_line.write_text(json.dumps({"prompt": "y" * 200}) + "\n")  # no line is read past the bound
    with pytest.raises(DataError, match=r"over 64 bytes \(.*long.jsonl:1\)"):
        RS.read_prompt_set(long_line)
    monkeypatch.setattr(RS, "MAX_LINES", 3)
    many = tmp_path / "many.jsonl"
    many.write_text('{"prompt": "a"}\n' * 4)
    with pytest.raises(DataError, match="more than 3 lines"):
        RS.read_prompt_set(many)
    monkeypatch.setattr(RS, "MAX_FILE_BYTES", 10)
    with pytest.raises(DataError, match="bytes"):
        RS.read_prompt_set(many)
    with pytest.raises(DataError, match="unknown built-in"):
        RS.load_prompt_set("builtin:nope")


def test_explicit_splits_win_and_halves_stay_disjoint():
    items = [RS.PromptItem(f"p{i}", "k") for i in range(10)] + [RS.PromptItem("p3", "k", split="evaluation")]
    cal, ev = RS.split_halves(items)
    assert "p3" in {i.prompt for i in ev} and "p3" not in {i.prompt for i in cal}
    assert not {i.prompt for i in cal} & {i.prompt for i in ev}
    with pytest.raises(DataError, match="per_kind"):
        RS.build_routing_set(per_kind=10**9)
