"""The routing prompt set: mixed edge traffic to calibrate and measure a small/large router on.

``builtin:routing-mixed`` (:func:`build_routing_set`) is several kinds of text whose difficulty
for the small branch differs visibly, each prompt a prefix to continue, with the text that
follows it in its source as ``continuation``, all from what is on this machine (nothing is
downloaded), none from the stdlib's pydoc topics (``builtin:python-docs``, the text the default
small branch was distilled and calibrated on; :func:`build_routing_set` drops any prompt that
occurs in it verbatim):

========================  =============================================================
kind                      source
========================  =============================================================
``prose``                 the PyPI READMEs of edgekit's dependencies (their installed METADATA)
``short``                 the first 2–6 words of a README sentence: very short prompts
``long``                  1200–2000 characters of the dependencies' licence texts
``code``                  Python source of third-party packages (click, rich, jinja2, ...)
``csv``                   CSV tables generated from a seeded RNG
``json``                  JSON records generated from a seeded RNG
``arithmetic``            integer arithmetic lines (``417 * 23 = 9591``), seeded
``non_english``           translated messages of the system's gettext catalogs
                          (``/usr/share/locale/{de,fr,es,ru,...}``): absent when there are none
========================  =============================================================

The evaluation uses the READMEs too (``builtin:package-readmes``): both are evaluation-only
text, never trained on. The set is deterministic for a given machine; :func:`build_routing_set`
returns a fingerprint (the packages and versions, the catalogs and the sha256 of the set) so
that numbers on two machines compare only where it matches.

Halves: within each kind, prompts sorted by the sha256 of their text; the first half (rounded
up) is the ``calibration`` half, the rest the ``evaluation`` half (:func:`split_halves`). A
prompt set file may set ``split`` per line instead.

A prompt set file (:func:`read_prompt_set`) is jsonl, one object a line::

    {"prompt": "417 * 23 = ", "kind": "arithmetic", "continuation": "9591", "split": "evaluation"}

``prompt`` is required; ``kind`` (a short lower-case name), ``continuation`` (the reference
text after the prompt) and ``split`` (``calibration`` | ``evaluation``) are optional. Blank
lines are skipped; anything else that is not such an object is refused with ``file:line``.
The file is bounded (:data:`MAX_FILE_BYTES`, :data:`MAX_LINES`, :data:`MAX_LINE_BYTES`), and
so is every field.

Stdlib only (and :mod:`edgekit.models.text`'s README reader): the runtime imports this to
calibrate on a device.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from edgekit.errors import DataError

BUILTIN_ROUTING_MIXED = "builtin:routing-mixed"
SPLITS = ("calibration", "evaluation")
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_LINES = 100_000
MAX_LINE_BYTES = 1024 * 1024
MAX_PROMPT_CHARS = 65_536
MAX_CONTINUATION_CHARS = 65_536
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_FIELDS = ("prompt", "kind", "continuation", "split")

#: characters of reference continuation kept per prompt (>= 32 tokens of any of these kinds)
CONTINUATION_CHARS = 320
#: third-party packages whose Python source makes the ``code`` kind: edgekit's direct
#: dependencies, so every install has them (a missing one is skipped, and the fingerprint says so)
CODE_PACKAGES = ("click", "rich", "jinja2", "starlette", "uvicorn", "h11", "pydantic", "pyyaml")
#: gettext domains and languages of the ``non_english`` kind, in this order
GETTEXT_DOMAINS = ("coreutils", "git", "glib20", "apt", "dpkg", "tar", "grep", "findutils", "bash", "wget", "systemd")
GETTEXT_LANGUAGES = ("de", "fr", "es", "ru", "zh_CN", "ja", "it", "pt_BR", "pl")
LOCALE_DIR = Path("/usr/share/locale")
_MAX_CATALOG_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    kind: str = "default"
    continuation: str | None = None
    split: str | None = None  # calibration | evaluation; None: by hash (split_halves)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "kind": self.kind}
        if self.continuation is not None:
            out["continuation"] = self.continuation
        if self.split is not None:
            out["split"] = self.split
        return out


# -- the jsonl format ---------------------------------------------------------------------------


def _item(value: Any, where: str) -> PromptItem:
    how = 'one JSON object a line: {"prompt": "...", "kind": "code", "continuation": "...", "split": "evaluation"}'
    if not isinstance(value, dict):
        raise DataError(f"a line is a JSON {type(value).__name__}, not an object", where=where, how=how)
    unknown = sorted(str(k)[:40] for k in value if k not in _FIELDS)
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(map(repr, unknown))}", where=where, how=f"use only {', '.join(_FIELDS)}")
    prompt = value.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError("'prompt' is missing, empty or not a string", where=where, how=how)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise DataError(f"'prompt' has {len(prompt)} characters (at most {MAX_PROMPT_CHARS})", where=where, how="shorten it")
    if "\x00" in prompt:
        raise DataError("'prompt' contains a NUL character", where=where, how="remove it")
    kind = value.get("kind", "default")
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise DataError(f"'kind' must be a short lower-case name ([a-z0-9_.-], at most 32), got {str(kind)[:40]!r}",
                        where=where, how="e.g. \"code\", \"prose\", \"non_english\"")
    continuation = value.get("continuation")
    if continuation is not None and (not isinstance(continuation, str) or len(continuation) > MAX_CONTINUATION_CHARS):
        raise DataError(f"'continuation' must be a string of at most {MAX_CONTINUATION_CHARS} characters", where=where,
                        how="give the reference text that follows the prompt, or leave it out")
    split = value.get("split")
    if split is not None and split not in SPLITS:
        raise DataError(f"'split' must be 'calibration' or 'evaluation', got {str(split)[:40]!r}", where=where,
                        how="or leave it out (halves by hash)")
    return PromptItem(prompt, kind, continuation, split)


def read_prompt_set(path: str | Path) -> list[PromptItem]:
    """The prompts of a jsonl prompt set file (module docstring), bounded and checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such prompt set file", where=str(path), how=f"give a .jsonl file or {BUILTIN_ROUTING_MIXED}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"the prompt set is {size} bytes (at most {MAX_FILE_BYTES})", where=str(path), how="split it")
    items: list[PromptItem] = []
    with path.open("rb") as f:
        for number in range(1, MAX_LINES + 2):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            where = f"{path}:{number}"
            if number > MAX_LINES:
                raise DataError(f"more than {MAX_LINES} lines", where=str(path), how="use fewer prompts")
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"the line is over {MAX_LINE_BYTES} bytes", where=where, how="shorten it")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("the line is not UTF-8", where=where, how="write the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise DataError(f"not JSON ({str(exc)[:80]})", where=where, how="one JSON object a line") from None
            items.append(_item(value, where))
    if not items:
        raise DataError("the prompt set has no prompts", where=str(path), how='add lines like {"prompt": "..."}')
    return items


def write_prompt_set(path: str | Path, items: Iterable[PromptItem]) -> Path:
    """Write ``items`` as jsonl (temp file + rename: never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_prompt_set(spec: str | Path) -> tuple[list[PromptItem], dict[str, Any]]:
    """``(items, fingerprint)`` of ``builtin:routing-mixed`` or a jsonl file."""
    if str(spec) == BUILTIN_ROUTING_MIXED:
        return build_routing_set()
    if str(spec).startswith("builtin:"):
        raise DataError(f"unknown built-in prompt set {str(spec)[:60]!r}", where="--prompt-set", how=f"use {BUILTIN_ROUTING_MIXED} or a .jsonl file")
    path = Path(spec)
    items = read_prompt_set(path)
    from edgekit.hashing import sha256_file

    return items, {"file": str(path), "sha256": sha256_file(path), "prompts": len(items)}


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_halves(items: Sequence[PromptItem]) -> tuple[list[PromptItem], list[PromptItem]]:
    """``(calibration, evaluation)``: an item's own ``split`` when it has one, else per kind by
    the sha256 of its prompt (module docstring). Deterministic and disjoint; a prompt that
    occurs twice goes to one half only."""
    calibration: list[PromptItem] = []
    evaluation: list[PromptItem] = []
    by_kind: dict[str, list[PromptItem]] = {}
    for item in items:
        if item.split == "calibration":
            calibration.append(item)
        elif item.split == "evaluation":
            evaluation.append(item)
        else:
            by_kind.setdefault(item.kind, []).append(item)
    for kind in sorted(by_kind):
        unique: dict[str, PromptItem] = {}
        for item in by_kind[kind]:
            unique.setdefault(item.prompt, item)
        ordered = sorted(unique.values(), key=lambda i: _text_hash(i.prompt))
        half = (len(ordered) + 1) // 2
        calibration += ordered[:half]
        evaluation += ordered[half:]
    evaluation_prompts = {i.prompt for i in evaluation}
    calibration = [i for i in calibration if i.prompt not in evaluation_prompts]  # an explicit split wins
    return calibration, evaluation


# -- the builtin set ---------------------------------------------------------------------------


def _windows(text: str, n: int, rng: random.Random, lo: int, hi: int, *, cut: str = " ") -> list[tuple[str, str]]:
    """``n`` (prompt, continuation) pairs spread evenly over ``text``: prompts of ``lo``..``hi``
    characters starting after a ``cut`` character, the continuation the text right after."""
    out = []
    span = len(text) - hi - CONTINUATION_CHARS
    if span <= 0 or n <= 0:
        return out
    for i in range(n):
        start = round(i * span / max(1, n - 1))
        at = text.find(cut, start, start + 200)
        start = at + 1 if at >= 0 else start
        length = rng.randint(lo, hi)
        end = text.rfind(" ", start + lo // 2, start + length)  # end the prompt at a word boundary
        end = end if end > start else start + length
        prompt, continuation = text[start:end], text[end:end + CONTINUATION_CHARS]
        if prompt.strip() and continuation.strip():
            out.append((prompt, continuation))
    return out


def _readme_text() -> tuple[str, dict[str, str]]:
    from edgekit.models.text import package_readmes

    readmes = package_readmes()
    return "\n\n".join(prose for _, _, prose in readmes), {name: version for name, version, _ in readmes}


def _short_prompts(text: str, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """The first 2–6 words of sentences that start a line or follow '. ', spread over ``text``."""
    starts = [m.end() for m in re.finditer(r"(?:^|\n|\. )(?=[A-Z][a-z]+ [a-z])", text)]
    out: list[tuple[str, str]] = []
    pool = 3 * n  # candidates spread over the text, taken in order until n are usable
    for i in range(min(pool, len(starts))):
        if len(out) == n:
            break
        start = starts[round(i * (len(starts) - 1) / max(1, pool - 1))]
        words = text[start:start + 200].split(" ")
        prompt = " ".join(words[:rng.randint(2, 6)])
        if "\n" in prompt or len(prompt) < 6:
            continue
        end = start + len(prompt)
        out.append((prompt, text[end:end + CONTINUATION_CHARS]))
    return out


def _license_text() -> tuple[str, dict[str, str]]:
    import importlib.metadata as metadata

    seen, texts, versions = set(), [], {}
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for file in sorted(dist.files or [], key=str):
            name = str(file).upper()
            if ".DIST-INFO/" not in name or not any(k in name.rsplit("/", 1)[-1] for k in ("LICEN", "COPYING")):
                continue
            try:
                path = Path(file.locate())
                if path.stat().st_size > 256 * 1024:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            text = re.sub(r"[ \t]+", " ", text).strip()
            key = _text_hash(text)
            if len(text) < 400 or key in seen:
                continue
            seen.add(key)
            texts.append(text)
            versions[dist.metadata["Name"]] = dist.version
    return "\n\n".join(texts), versions


def _code_text() -> tuple[str, dict[str, str]]:
    import importlib.metadata as metadata

    parts, versions = [], {}
    for name in CODE_PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        files = sorted((f for f in dist.files or [] if str(f).endswith(".py") and "/tests/" not in str(f)), key=str)
        for file in files:
            try:
                path = Path(file.locate())
                if path.stat().st_size > 512 * 1024:
                    continue
                parts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        versions[name] = dist.version
    return "\n\n".join(parts), versions


def _catalog_messages(path: Path) -> list[str]:
    """The translated messages of one compiled gettext catalog (.mo), via the stdlib's parser."""
    import gettext

    try:
        if path.stat().st_size > _MAX_CATALOG_BYTES:
            return []
        with path.open("rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # noqa: SLF001 - the parsed msgid -> msgstr table
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return []
    out = []
    for key in sorted(catalog, key=lambda k: str(k)):
        value = catalog[key]
        if key and isinstance(value, str) and len(value) >= 30 and value != key:
            out.append(" ".join(value.split()))
    return out


def _non_english_texts() -> tuple[list[str], dict[str, str]]:
    texts, used = [], {}
    for language in GETTEXT_LANGUAGES:
        messages = []
        for domain in GETTEXT_DOMAINS:
            path = LOCALE_DIR / language / "LC_MESSAGES" / f"{domain}.mo"
            if path.is_file():
                found = _catalog_messages(path)
                if found:
                    messages += found
                    from edgekit.hashing import sha256_file

                    used[f"{language}/{domain}.mo"] = sha256_file(path)[:16]
        if messages:
            texts.append("\n".join(messages))
    return texts, used


def _csv_table(rng: random.Random, rows: int) -> str:
    columns = rng.choice([
        ("date", "city", "temperature_c", "humidity_pct", "wind_kmh"),
        ("order_id", "customer", "product", "quantity", "unit_price"),
        ("timestamp", "sensor", "voltage", "current_ma", "status"),
        ("employee_id", "name", "department", "salary", "start_year"),
    ])
    cities = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth", "Quito", "Tunis", "Riga", "Hanoi"]
    names = ["Ada", "Bo", "Chen", "Dara", "Eun", "Femi", "Gus", "Hana", "Ivo", "Juno"]
    products = ["bolt M4", "gear 12T", "belt 300mm", "fan 40mm", "relay 5V", "cable 2m"]
    lines = [",".join(columns)]
    for r in range(rows):
        if columns[0] == "date":
            row = [f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", rng.choice(cities), f"{rng.uniform(-10, 38):.1f}",
                   str(rng.randint(10, 99)), f"{rng.uniform(0, 60):.1f}"]
        elif columns[0] == "order_id":
            row = [str(100000 + rng.randint(0, 899999)), rng.choice(names), rng.choice(products), str(rng.randint(1, 500)),
                   f"{rng.uniform(0.05, 90):.2f}"]
        elif columns[0] == "timestamp":
            row = [str(1700000000 + r * 60 + rng.randint(0, 59)), f"s{rng.randint(1, 16):02d}", f"{rng.uniform(3.0, 5.2):.3f}",
                   str(rng.randint(0, 2500)), rng.choice(["ok", "ok", "ok", "warn", "fault"])]
        else:
            row = [f"E{rng.randint(1000, 9999)}", rng.choice(names), rng.choice(["ops", "r&d", "sales", "legal"]),
                   str(rng.randint(30, 180) * 1000), str(rng.randint(1995, 2024))]
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def _json_records(rng: random.Random, records: int) -> str:
    words = ["alpha", "bravo", "delta", "echo", "kilo", "lima", "oscar", "sierra", "tango", "zulu"]
    out = []
    for _ in range(records):
        record = {"id": rng.randint(1, 99999), "name": f"{rng.choice(words)}-{rng.randint(1, 99)}",
                  "active": rng.random() < 0.7, "score": round(rng.uniform(0, 100), 2),
                  "tags": rng.sample(words, rng.randint(0, 3)),
                  "location": {"lat": round(rng.uniform(-90, 90), 4), "lon": round(rng.uniform(-180, 180), 4)}}
        out.append(json.dumps(record))
    return "\n".join(out) + "\n"


def _arithmetic(rng: random.Random, lines: int) -> tuple[str, str]:
    def line() -> tuple[str, str]:
        op = rng.choice("+-*")
        a, b = rng.randint(2, 999), rng.randint(2, 99 if op == "*" else 999)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a} {op} {b} = ", f"{value}\n"

    text = "".join(q + a for q, a in (line() for _ in range(lines)))
    question, answer = line()
    continuation = answer + "".join(q + a for q, a in (line() for _ in range(12)))
    return text + question, continuation


def _generated(kind: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{seed}:{kind}")
    out = []
    for _ in range(n):
        if kind == "csv":
            table = _csv_table(rng, rng.randint(4, 14) + 8)
            lines = table.splitlines(keepends=True)
            k = rng.randint(3, len(lines) - 6)
            out.append(("".join(lines[:k]), "".join(lines[k:])[:CONTINUATION_CHARS]))
        elif kind == "json":
            text = _json_records(rng, rng.randint(2, 6) + 4)
            lines = text.splitlines(keepends=True)
            k = rng.randint(1, len(lines) - 3)
            out.append(("".join(lines[:k]), "".join(lines[k:])[:CONTINUATION_CHARS]))
        else:
            prompt, continuation = _arithmetic(rng, rng.randint(2, 10))
            out.append((prompt, continuation[:CONTINUATION_CHARS]))
    return out


def _pydoc_topics() -> str:
    from pydoc_data import topics

    return "\n".join(topics.topics.values())


def build_routing_set(per_kind: int = 75, *, seed: int = 0) -> tuple[list[PromptItem], dict[str, Any]]:
    """``builtin:routing-mixed``: ``(items, fingerprint)``, ``per_kind`` prompts of each kind the
    machine has (module docstring), halves assigned (:func:`split_halves`). Deterministic for a
    given machine and ``seed``. A :class:`DataError` when fewer than five kinds could be made."""
    if not isinstance(per_kind, int) or not 4 <= per_kind <= 2000:
        raise DataError(f"per_kind must be an integer in [4, 2000], got {per_kind!r}", where="build_routing_set", how="e.g. 75")
    rng = random.Random(seed)
    readmes, readme_versions = _readme_text()
    licenses, license_versions = _license_text()
    code, code_versions = _code_text()
    foreign, catalogs = _non_english_texts()
    pairs: dict[str, list[tuple[str, str]]] = {
        "prose": _windows(readmes, per_kind, rng, 150, 450),
        "short": _short_prompts(readmes[len(readmes) // 3:] + "\n" + readmes[: len(readmes) // 3], per_kind, rng),
        "long": _windows(licenses, per_kind, rng, 1200, 2000),
        "code": _windows(code, per_kind, rng, 150, 600, cut="\n"),
        "csv": _generated("csv", per_kind, seed),
        "json": _generated("json", per_kind, seed),
        "arithmetic": _generated("arithmetic", per_kind, seed),
    }
    if foreign:
        per_language = -(-per_kind // len(foreign))
        pooled = [p for text in foreign for p in _windows(text, per_language, rng, 120, 400)]
        pairs["non_english"] = pooled[:: max(1, len(pooled) // per_kind)][:per_kind]
    topics = _pydoc_topics()
    items, seen, dropped = [], set(), 0
    for kind, found in pairs.items():
        for prompt, continuation in found:
            if prompt in seen:
                continue
            if len(prompt) >= 12 and prompt in topics:  # the small branch's training text: never a prompt
                dropped += 1
                continue
            seen.add(prompt)
            items.append(PromptItem(prompt, kind, continuation))
    kinds = sorted({i.kind for i in items})
    if len(kinds) < 5:
        raise DataError(f"only {len(kinds)} kinds of text could be made here ({', '.join(kinds)})", where=BUILTIN_ROUTING_MIXED,
                        how="install edgekit's dependencies (their READMEs, licences and source are the text)")
    calibration, evaluation = split_halves(items)
    halves = {id(i): "calibration" for i in calibration} | {id(i): "evaluation" for i in evaluation}
    items = [PromptItem(i.prompt, i.kind, i.continuation, halves[id(i)]) for i in items]
    digest = hashlib.sha256("\n".join(json.dumps(i.to_json(), ensure_ascii=False) for i in items).encode()).hexdigest()
    fingerprint = {
        "builtin": BUILTIN_ROUTING_MIXED, "seed": seed, "per_kind": per_kind, "prompts": len(items),
        "kinds": {k: sum(i.kind == k for i in items) for k in kinds},
        "readme_packages": readme_versions, "code_packages": code_versions, "license_packages": len(license_versions),
        "gettext_catalogs": catalogs, "dropped_as_pydoc_topics": dropped, "sha256": digest,
    }
    return items, fingerprint


__all__ = [
    "BUILTIN_ROUTING_MIXED", "MAX_FILE_BYTES", "MAX_LINES", "MAX_LINE_BYTES", "PromptItem", "SPLITS", "build_routing_set",
    "load_prompt_set", "read_prompt_set", "split_halves", "write_prompt_set",
]
