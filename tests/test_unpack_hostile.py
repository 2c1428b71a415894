"""`edgekit unpack` (edgekit.bundle.archive.safe_extract) against hand-built hostile archives.

Each archive is a small bundle-shaped tar (``tiny/`` with a manifest.json whose files table
lists sha256 and size) with one thing wrong. What is checked is that the archive is refused
*by name* and that (next to) nothing was written: the old extraction wrote whatever size a
member claimed before the manifest check ran.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from edgekit.bundle import archive
from edgekit.bundle.archive import (
    bundle_path_problem,
    clean_stale_unpack_dirs,
    safe_extract,
    verify_manifest_files,
)
from edgekit.errors import EdgekitError

FILES = {"model.onnx": b"graph " * 50, "tokenizer.json": b'{"v": 1}', "sub/weights.bin": bytes(range(256)) * 8}
GiB = 2**30


def _table(files: dict[str, bytes]) -> dict[str, dict]:
    return {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for rel, data in files.items()}


def _manifest(files: dict[str, bytes], table: dict | None = None) -> bytes:
    return json.dumps({"name": "tiny", "files": table if table is not None else _table(files)}).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs) -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        return
    info.size, info.mode = len(data), 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def build(path: Path, files: dict[str, bytes] | None = None, *, manifest: bytes | None = None,
          extra: list[tuple[str, bytes | None]] = (), skip: tuple[str, ...] = ()) -> Path:
    """A bundle-shaped tar: tiny/, its files, tiny/manifest.json (their table unless given)."""
    files = FILES if files is None else files
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "tiny")
        _add(tar, "tiny/sub")
        for rel, data in files.items():
            if rel not in skip:
                _add(tar, f"tiny/{rel}", data)
        _add(tar, "tiny/manifest.json", manifest if manifest is not None else _manifest(files))
        for name, data in extra:
            _add(tar, name, data)
    return path


def _raw_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def claim_huge(path: Path, claimed: int, *, manifest_size: int | None = None, kind: bytes = tarfile.REGTYPE,
               name: str = "tiny/weights.bin") -> Path:
    """A tar whose member ``name`` claims ``claimed`` bytes of data; the data is a hole in a
    sparse file on disk (costs nothing here), followed by a valid end-of-archive marker."""
    table = _table({"model.onnx": FILES["model.onnx"]})
    table["weights.bin"] = {"sha256": "0" * 64, "size": claimed if manifest_size is None else manifest_size}
    build(path, {"model.onnx": FILES["model.onnx"]}, manifest=_manifest({}, table))
    data = path.read_bytes()
    end = data.rstrip(b"\0")
    end += b"\0" * (-len(end) % tarfile.BLOCKSIZE)
    with open(path, "wb") as handle:
        handle.write(end)
        handle.write(_raw_header(name, claimed, kind))
        handle.seek(claimed + (-claimed % tarfile.BLOCKSIZE), os.SEEK_CUR)  # a hole: the claimed data
        handle.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return path


def written(dest: Path) -> int:
    """Bytes actually allocated under ``dest`` (st_blocks: holes and claims do not count)."""
    return sum(p.stat().st_blocks * 512 for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0


@pytest.fixture
def dest(tmp_path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


def _never(extracted: Path) -> None:
    raise AssertionError(f"extracted before the refusal: {written(extracted.parent)} bytes written")


def _refused(archive_path: Path, dest: Path, match: str, **kw) -> EdgekitError:
    with pytest.raises(EdgekitError, match=match) as info:
        safe_extract(archive_path, dest, **kw)
    assert "\n" not in str(info.value)
    assert list(dest.iterdir()) == [], sorted(p.name for p in dest.iterdir())  # no bundle, no temp folder
    return info.value


# --- the archive that should unpack ---------------------------------------------------------


def test_a_well_formed_archive_unpacks_plain_and_gzipped(tmp_path, dest):
    final = safe_extract(build(tmp_path / "ok.tar"), dest)
    assert final == dest / "tiny"
    assert {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()} == {
        **FILES, "manifest.json": _manifest(FILES)}
    assert verify_manifest_files(final) == (3, sum(len(v) for v in FILES.values()))
    assert sorted(p.name for p in dest.iterdir()) == ["tiny"]  # the temp folder is gone
    gz = tmp_path / "ok.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "ok.tar").read_bytes()))
    assert safe_extract(gz, tmp_path / "gz").is_dir()


# --- sizes and types against the manifest, before a byte is written ---------------------------


def test_a_member_claiming_a_gibibyte_the_manifest_does_not_is_refused_from_its_header(tmp_path, dest):
    hostile = claim_huge(tmp_path / "huge.tar", GiB, manifest_size=10)
    error = _refused(hostile, dest, r"member 'tiny/weights\.bin' declares 1073741824 bytes, but the manifest says 10",
                     check=_never)
    assert str(hostile) in str(error)
    assert written(dest) == 0


def test_a_manifest_that_agrees_with_a_huge_member_meets_the_bound(tmp_path, dest):
    hostile = claim_huge(tmp_path / "huge.tar", GiB)  # manifest and header both say 1 GiB
    _refused(hostile, dest, r"the bundle declares 1073\.7 MB, more than this unpack allows \(1\.0 MB\)", max_bytes=2**20,
             check=_never)
    assert written(dest) == 0


def test_a_member_whose_size_differs_from_the_manifest_is_refused_by_name(tmp_path, dest):
    table = _table(FILES)
    table["tokenizer.json"]["size"] += 1
    _refused(build(tmp_path / "size.tar", manifest=_manifest(FILES, table)), dest,
             r"member 'tiny/tokenizer\.json' declares 8 bytes, but the manifest says 9")


def test_a_member_not_in_the_manifest_is_refused_by_name(tmp_path, dest):
    _refused(build(tmp_path / "extra.tar", extra=[("tiny/sitecustomize.py", b"import os\n")]), dest,
             r"member 'tiny/sitecustomize\.py' is not in the manifest's file table")


def test_a_listed_file_missing_from_the_archive_is_refused(tmp_path, dest):
    _refused(build(tmp_path / "missing.tar", skip=("tokenizer.json",)), dest,
             r"tokenizer\.json is listed in manifest\.json but not in the archive")


def test_an_archive_without_a_manifest_is_refused(tmp_path, dest):
    path = tmp_path / "nomanifest.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "tiny")
        _add(tar, "tiny/model.onnx", b"x")
    _refused(path, dest, r"the archive has no tiny/manifest\.json")


def test_a_file_whose_bytes_differ_from_its_sha256_is_refused_and_removed(tmp_path, dest):
    table = _table(FILES)
    table["sub/weights.bin"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    _refused(build(tmp_path / "sha.tar", manifest=_manifest(FILES, table)), dest,
             r"^sub/weights\.bin does not match its sha256 in manifest\.json")


def test_a_sparse_member_is_refused(tmp_path, dest):
    hostile = claim_huge(tmp_path / "sparse.tar", 4096, kind=tarfile.GNUTYPE_SPARSE)
    _refused(hostile, dest, r"member 'tiny/weights\.bin' is a sparse file")
    # the pax form (GNU sparse 0.1 keywords), as GNU tar writes it with --sparse --format=pax
    path = tmp_path / "pax-sparse.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "tiny")
        _add(tar, "tiny/weights.bin", b"\0" * 10,
             pax_headers={"GNU.sparse.size": str(GiB), "GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0",
                          "GNU.sparse.numbytes": "10", "GNU.sparse.map": "0,10"})
    _refused(path, dest, r"member 'tiny/weights\.bin' is a sparse file")
    assert written(dest) == 0


def test_a_contiguous_or_unknown_member_type_is_refused(tmp_path, dest):
    hostile = claim_huge(tmp_path / "cont.tar", 10, kind=tarfile.CONTTYPE)
    _refused(hostile, dest, r"member 'tiny/weights\.bin' is not a regular file or directory \(tar type b'7'\)")


def test_a_pax_header_claiming_a_gibibyte_is_not_read_into_memory(tmp_path, dest):
    hostile = claim_huge(tmp_path / "pax.tar", GiB, kind=tarfile.XHDTYPE, name="tiny/PaxHeader")
    _refused(hostile, dest, r"damaged or truncated .*more than 8388608")


def test_too_many_members_are_refused(tmp_path, dest, monkeypatch):
    monkeypatch.setattr(archive, "MAX_MEMBERS", 20)
    extra = [(f"tiny/d{i}", None) for i in range(30)]
    _refused(build(tmp_path / "many.tar", extra=extra), dest, r"the archive has more than 20 members")


def test_a_manifest_over_its_bound_is_refused_unread(tmp_path, dest, monkeypatch):
    monkeypatch.setattr(archive, "MAX_MANIFEST_BYTES", 64)
    _refused(build(tmp_path / "bigmanifest.tar"), dest, r"member 'tiny/manifest\.json' declares \d+ bytes \(a manifest is at most 64\)")


def test_the_free_space_is_checked_before_writing(tmp_path, dest, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    _refused(build(tmp_path / "ok.tar"), dest, r"out of space: the bundle needs 0\.0 MB but only 0\.0 MB are free")


# --- names: members and manifest rows ---------------------------------------------------------


BAD_PATHS = {
    "traversal": "../evil",
    "inner traversal": "sub/../../evil",
    "absolute": "/etc/passwd",
    "NUL": "model\x00.onnx",
    "backslash": "sub\\evil",
    "empty": "",
    "empty component": "sub//x",
    "trailing slash": "sub/",
    "dot": "./model.onnx",
    "hidden": ".bashrc",
    "leading dash": "-rf",
    "over-long component": "a" * 129,
    "over-long path": "/".join(["a" * 100] * 11),
    "too deep": "/".join(["d"] * 17),
    "space": "model onnx",
}


@pytest.mark.parametrize("case", sorted(BAD_PATHS))
def test_manifest_rows_must_be_safe_relative_paths(case, tmp_path, dest):
    rel = BAD_PATHS[case]
    assert bundle_path_problem(rel) is not None
    table = _table(FILES)
    table[rel] = {"sha256": "0" * 64, "size": 1}
    manifest = _manifest(FILES, table)
    _refused(build(tmp_path / "row.tar", manifest=manifest), dest, r"invalid file name in manifest\.json ")
    # ... and the same manifest in a bundle directory (deploy, verify_manifest_files)
    bundle = tmp_path / "dir" / "tiny"
    bundle.mkdir(parents=True)
    for name, data in FILES.items():
        (bundle / name).parent.mkdir(exist_ok=True)
        (bundle / name).write_bytes(data)
    (bundle / "manifest.json").write_bytes(manifest)
    with pytest.raises(EdgekitError, match=r"invalid file name in manifest\.json "):
        verify_manifest_files(bundle)


@pytest.mark.parametrize("row", [{"size": -1, "sha256": "0" * 64}, {"size": "1", "sha256": "0" * 64},
                                 {"size": True, "sha256": "0" * 64}, {"size": 1, "sha256": "xyz"}, "not a dict"])
def test_manifest_rows_must_have_a_size_and_a_sha256(row, tmp_path, dest):
    table = {**_table(FILES), "model.onnx": row}
    _refused(build(tmp_path / "row.tar", manifest=_manifest(FILES, table)), dest,
             r"manifest\.json's row for model\.onnx has no valid (size|sha256)")


@pytest.mark.parametrize("name, message", [
    ("tiny/.hidden", "has an unsafe name"),
    ("tiny/sub\\x", "has an unsafe name"),
    ("tiny/" + "a" * 129, "has an unsafe name"),
    ("tiny/x y", "has an unsafe name"),
])
def test_member_names_follow_the_name_rule(name, message, tmp_path, dest):
    _refused(build(tmp_path / "name.tar", extra=[(name, b"x")]), dest, f"member .* {message}")


@pytest.mark.parametrize("top", ["-rf", ".tiny", "ti ny", "a" * 129])
def test_the_top_directory_follows_the_name_rule(top, tmp_path, dest):
    path = tmp_path / "top.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, top)
        _add(tar, f"{top}/model.onnx", b"x")
        _add(tar, f"{top}/manifest.json", _manifest({"model.onnx": b"x"}))
    _refused(path, dest, r"(unsafe top directory name|has an unsafe name)")


# --- temporary folders of killed unpacks ----------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_dead_unpacks_are_removed_and_nothing_else(tmp_path, dest):
    dead = dest / f".edgekit-unpack-{_dead_pid()}-abc_12x"
    (dead / "tiny").mkdir(parents=True)
    (dead / "tiny" / "model.onnx").write_bytes(b"half")
    alive = dest / f".edgekit-unpack-{os.getppid()}-zzz"  # a live process's: may be unpacking now
    alive.mkdir()
    old_alive = dest / f".edgekit-unpack-{os.getppid()}-old"
    old_alive.mkdir()
    os.utime(old_alive, (time.time() - archive.STALE_AFTER_S - 60,) * 2)
    keep = [dest / "unrelated", dest / ".edgekit-unpack-notapid-x", dest / ".tiny.unpack-abc", dest / "edgekit-unpack-1-x"]
    for path in keep:
        path.mkdir()
        (path / "data").write_text("keep me")
    link = dest / ".edgekit-unpack-1-link"
    link.symlink_to(tmp_path)  # a link with our name: never followed, never removed
    final = safe_extract(build(tmp_path / "ok.tar"), dest)
    assert final.is_dir()
    assert not dead.exists() and not old_alive.exists()
    assert alive.is_dir() and link.is_symlink() and all((p / "data").read_text() == "keep me" for p in keep)
    assert clean_stale_unpack_dirs(dest) == []


def test_a_killed_unpack_leaves_a_folder_the_next_unpack_removes(tmp_path, dest):
    tar = build(tmp_path / "ok.tar")
    started = tmp_path / "started"
    # An unpack killed (SIGKILL) while its temp folder exists: the check hook blocks there.
    code = ("import sys, time; from pathlib import Path; from edgekit.bundle.archive import safe_extract\n"
            "def hold(d):\n    Path(sys.argv[3]).write_text(str(d)); time.sleep(600)\n"
            "safe_extract(sys.argv[1], sys.argv[2], check=hold)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tar), str(dest), str(started)])
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, "the unpack ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in dest.iterdir()]
    assert left == [p.name for p in dest.glob(f".edgekit-unpack-{proc.pid}-*")] and len(left) == 1, left
    (dest / "unrelated").mkdir()
    final = safe_extract(tar, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["tiny", "unrelated"]
    assert verify_manifest_files(final)[0] == 3
