"""The edgekit runtime that a deploy installs on the device: an sdist of this source checkout.

An sdist, not a wheel: the C fast path (edgekit/runtime/_fastpath.c) must be compiled on the
device, for its CPU and Python. It is built here with setuptools' PEP 517 backend in a
subprocess (cwd = the checkout) and cached under ``<edgekit cache>/runtime-sdist/<key>/``,
keyed by a hash of the source files that go into it, so a fleet deploy builds it at most once
and an unchanged checkout never rebuilds it. ``--runtime FILE`` ships a prebuilt sdist instead
(for an installed, non-editable edgekit, which has no checkout to build from).

The key (``<edgekit version>-<12 hex>``) also names the runtime's directory on the device, so
a changed checkout installs a new runtime even when the version string did not change.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import DeployError


# The files of the checkout that make up the runtime (what setuptools puts into the sdist from
# pyproject.toml's packages, package data and extension sources). Their hash keys the runtime,
# for a checkout and for a prebuilt sdist alike: the same sources give the same key.
def is_source(rel: str) -> bool:
    parts = rel.split("/")
    if "__pycache__" in parts:
        return False
    if len(parts) == 1:
        return rel in ("pyproject.toml", "setup.py", "README.md")
    if parts[0] == "edgekit":
        return rel.endswith((".py", ".c"))
    return len(parts) == 2 and parts[0] in ("targets", "recipes") and rel.endswith(".yaml")


KEEP_CACHED = 3
_SDIST_NAME = re.compile(r"^edgekit-([0-9][0-9A-Za-z.+_-]*)\.tar\.gz$")
_lock = threading.Lock()


@dataclass(frozen=True)
class RuntimeDist:
    path: Path
    key: str  # <version>-<12 hex>: the runtime's directory name on the device
    version: str


def source_checkout() -> Path | None:
    """The checkout this edgekit runs from (an editable install), or None for an installed package."""
    import edgekit

    root = Path(edgekit.__file__).resolve().parent.parent
    markers = (root / "pyproject.toml", root / "setup.py", root / "edgekit" / "runtime" / "_fastpath.c")
    return root if all(path.is_file() for path in markers) else None


def require_checkout() -> Path:
    root = source_checkout()
    if root is None:
        raise DeployError("this edgekit is an installed package, not a source checkout, so there is no runtime to build",
                          where="--runtime",
                          how="pass --runtime FILE with an edgekit sdist (python -m build --sdist in a checkout)")
    return root


def _hash_sources(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return digest.hexdigest()


def source_hash(root: Path) -> str:
    candidates = [root / name for name in ("pyproject.toml", "setup.py", "README.md")]
    for folder in ("edgekit", "targets", "recipes"):
        candidates += (root / folder).rglob("*")
    files = {}
    for path in candidates:
        rel = path.relative_to(root).as_posix()
        if is_source(rel) and path.is_file():
            files[rel] = path.read_bytes()
    return _hash_sources(files)


def prebuilt(path: str | Path) -> RuntimeDist:
    """``--runtime FILE``: an edgekit sdist (edgekit-<version>.tar.gz), keyed by its sources."""
    import tarfile

    path = Path(path).expanduser()
    match = _SDIST_NAME.match(path.name)
    if not path.is_file() or not match:
        raise DeployError("not an edgekit sdist (edgekit-<version>.tar.gz)", where=str(path),
                          how="build one in an edgekit checkout (python -m build --sdist) and pass dist/edgekit-<version>.tar.gz")
    top = f"edgekit-{match.group(1)}/"
    files = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                rel = member.name.removeprefix(top)
                if member.isfile() and member.name.startswith(top) and is_source(rel):
                    files[rel] = tar.extractfile(member).read()  # read in memory only; nothing is extracted here
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DeployError(f"cannot read the sdist: {exc}", where=str(path), how="rebuild it (python -m build --sdist)") from None
    if "edgekit/__init__.py" not in files:
        raise DeployError("not an edgekit sdist (no edgekit/__init__.py inside)", where=str(path), how="pass an edgekit sdist")
    return RuntimeDist(path=path.resolve(), key=f"{match.group(1)}-{_hash_sources(files)[:12]}", version=match.group(1))


def runtime_key(root: Path) -> str:
    from edgekit import __version__

    return f"{__version__}-{source_hash(root)[:12]}"


def build_sdist(cache_dir: Path) -> RuntimeDist:
    """The sdist of this checkout, from the cache or built now (thread-safe: a fleet builds it once)."""
    from edgekit import __version__

    root = require_checkout()
    with _lock:
        key = runtime_key(root)
        entry = Path(cache_dir) / "runtime-sdist" / key
        sdist = entry / f"edgekit-{__version__}.tar.gz"
        if sdist.is_file():
            return RuntimeDist(path=sdist, key=key, version=__version__)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        try:
            code = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_sdist(sys.argv[1]))"
            proc = subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=root, capture_output=True, text=True, timeout=600)
            built = tmp / proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
            if built is None or not built.is_file():
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DeployError(f"building the edgekit sdist failed: {last}", where=str(root),
                                  how="run `python -m build --sdist` there to see why, or pass --runtime FILE")
            os.replace(built, tmp / sdist.name)
            try:
                os.rename(tmp, entry)
            except OSError:  # another process put the same key in place first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(entry.parent, keep=entry)
        return RuntimeDist(path=sdist, key=key, version=__version__)


def _prune(cache: Path, *, keep: Path) -> None:
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_CACHED - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
