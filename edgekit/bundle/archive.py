"""Safe extraction of a bundle's ``.tar`` and the check of its files against the manifest.

A bundle archive is what :func:`edgekit.bundle.manifest.write_tar` writes: one top directory
(the bundle's name) holding regular files and directories, nothing else, and every file
listed with its size and sha256 in the bundle's ``manifest.json``. Anything else is refused
*before a byte is written*, with the member named:

* a name that breaks the safe-name rule (:mod:`edgekit.names`) in any component: absolute
  names, ``..``, NUL, backslashes, empty or over-long names, hidden (dot) names;
  members outside the single top directory;
* any link. Symbolic or hard links that leave the bundle are the classic way a tar writes
  outside its destination; links that stay inside are refused too, because ``write_tar``
  never produces one (a bundle's files are copies), so a link means the archive did not come
  from edgekit, and a link inside a bundle makes "the file that was verified" and "the file
  that is loaded" two different things;
* device nodes, FIFOs, sparse and other special members; a name that appears twice; a
  member below a name that is a file;
* a file that is not in the manifest's table, or whose declared size differs from the
  manifest's (a member claiming 1 GiB where the manifest says 10 kB is refused from its
  header, without reading or writing its data); a manifest file missing from the archive;
* more than :data:`MAX_MEMBERS` members, a manifest larger than :data:`MAX_MANIFEST_BYTES`,
  a bundle larger than ``max_bytes`` (:data:`MAX_TOTAL_BYTES`) or than the free space.

Only then are files written, each streamed through sha256 and refused (naming it) as soon as
it differs from the manifest, into a temporary directory beside the destination named
``.edgekit-unpack-<pid>-<random>``; an optional check runs on the extracted bundle, and only
then is it renamed into place: an interrupted, malformed or failing unpack leaves nothing at
the destination. A temporary directory left by a killed unpack (SIGKILL, power loss) is
removed by the next unpack into the same destination once its process is gone (or it is
older than :data:`STALE_AFTER_S`); nothing else there is touched.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgekit.bundle.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME  # noqa: F401 (the format's names)
from edgekit.errors import EdgekitError, OutputError, SignatureError
from edgekit.names import MAX_PATH_DEPTH, STALE_AFTER_S, check_relative_path, clean_stale_temp_dirs, name_problem, relative_path_problem, require_inside, shown

_HOW_ARCHIVE = "use the .tar written by `edgekit compress` (or re-create it from the bundle directory); do not unpack this file"

MAX_MEMBERS = 10_000  # a bundle has a few dozen files
MAX_SIGNATURE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 256 * 2**30  # the default bound on what one unpack writes
MAX_DEPTH = MAX_PATH_DEPTH
_MAX_HEADER_READ = 8 * 2**20  # the largest single read tarfile may make (pax / GNU long-name headers)
_CHUNK = 1 << 20
UNPACK_TEMP_PREFIX = ".edgekit-unpack-"
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- bundle-relative paths and the file table


# One rule for relative paths, shared with the runtime and the engine record (edgekit.names).
bundle_path_problem = relative_path_problem
check_bundle_path = check_relative_path


def check_file_table(files: Any, *, where: str, error_cls: type[EdgekitError] = EdgekitError,
                     how: str = "rebuild the bundle (edgekit compress)") -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` table after checking its shape: at most :data:`MAX_MEMBERS`
    rows, each a safe bundle path (:func:`bundle_path_problem`) with an integer ``size`` >= 0
    and a 64-hex ``sha256``; manifest.json itself is never a row. Raises naming the row."""
    if not isinstance(files, dict) or not files:
        raise error_cls("manifest.json has no file table", where=where, how=how)
    if len(files) > MAX_MEMBERS:
        raise error_cls(f"manifest.json lists {len(files)} files (at most {MAX_MEMBERS})", where=where, how=how)
    for rel, meta in files.items():
        check_bundle_path(rel, what="file name in manifest.json", where=where, error_cls=error_cls, how=how)
        if rel == MANIFEST_NAME:
            raise error_cls("manifest.json lists itself in its file table", where=where, how=how)
        size = meta.get("size") if isinstance(meta, dict) else None
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise error_cls(f"manifest.json's row for {rel} has no valid size", where=where, how=how)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise error_cls(f"manifest.json's row for {rel} has no valid sha256", where=where, how=how)
    return files


def bundle_listing(bundle_dir: Path) -> list[str]:
    """Every regular file below ``bundle_dir`` (relative, posix, sorted). A symbolic link or a
    special file anywhere raises: what is verified must be what is in the bundle, and a link
    can point anywhere (or be re-pointed after the check)."""
    files = []
    for root, dirs, names in os.walk(bundle_dir, followlinks=False):
        for name in dirs + names:
            path = Path(root) / name
            rel = path.relative_to(bundle_dir).as_posix()
            if path.is_symlink():
                raise SignatureError(f"{rel} is a symbolic link (to {os.readlink(path)}); a signed bundle holds only plain files",
                                     where=str(path), how="replace the link by the file it points to, or remove it")
            if name in names:
                if not path.is_file():
                    raise SignatureError(f"{rel} is not a regular file", where=str(path), how="remove it from the bundle")
                files.append(rel)
    return sorted(files)


# --------------------------------------------------------------------------- members


def _refuse(member: tarfile.TarInfo | str, what: str, tar_path: Path) -> EdgekitError:
    name = member.name if isinstance(member, tarfile.TarInfo) else member
    return EdgekitError(f"unsafe bundle archive: member {shown(name, 60)} {what}", where=str(tar_path), how=_HOW_ARCHIVE)


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


def check_members(members: list[tarfile.TarInfo], tar_path: Path) -> str:
    """The archive's single top directory; raises naming the first member that is not a
    plain file or directory inside it, or whose name breaks the safe-name rule."""
    top: str | None = None
    seen: dict[str, tarfile.TarInfo] = {}
    if len(members) > MAX_MEMBERS:
        raise EdgekitError(f"the archive has more than {MAX_MEMBERS} members", where=str(tar_path), how=_HOW_ARCHIVE)
    for member in members:
        name = member.name
        if "\x00" in name:
            raise _refuse(member, "has a NUL byte in its name", tar_path)
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or name.startswith("\\"):
            raise _refuse(member, "has an absolute path", tar_path)
        parts = _parts(name)
        if ".." in parts:
            raise _refuse(member, "has a '..' component (it would land outside the destination)", tar_path)
        if member.issym() or member.islnk():
            kind = "symbolic link" if member.issym() else "hard link"
            target = member.linkname
            if member.issym():
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
            else:  # a hard link's target is a name inside the archive
                resolved = posixpath.normpath(target)
            inside = (not target.startswith("/") and not resolved.startswith("..") and parts
                      and _parts(resolved)[:1] == parts[:1])
            if not inside:
                raise _refuse(member, f"is a {kind} to {target!r}, which leaves the bundle", tar_path)
            raise _refuse(member, f"is a {kind} (to {target!r}); a bundle archive holds only files and directories", tar_path)
        if member.ischr() or member.isblk():
            raise _refuse(member, "is a device node", tar_path)
        if member.isfifo():
            raise _refuse(member, "is a FIFO", tar_path)
        if member.issparse():
            raise _refuse(member, "is a sparse file; a bundle archive holds only plain files and directories", tar_path)
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            raise _refuse(member, f"is not a regular file or directory (tar type {member.type!r})", tar_path)
        if not parts:
            if member.isdir():  # "./": the archive root itself, as `tar -C dir .` writes it
                continue
            raise _refuse(member, "has an empty name", tar_path)
        if len(parts) > 1:
            problem = bundle_path_problem("/".join(parts[1:]))
            if problem is not None:
                raise _refuse(member, f"has an unsafe name ({problem})", tar_path)
        problem = name_problem(parts[0])
        if problem is not None:
            raise _refuse(member, f"has an unsafe top directory name ({problem})", tar_path)
        if top is None:
            top = parts[0]
        elif parts[0] != top:
            raise _refuse(member, f"is outside the archive's single top directory {top!r}", tar_path)
        if len(parts) == 1 and not member.isdir():
            raise _refuse(member, "is a file at the top level (a bundle archive holds one directory)", tar_path)
        key = "/".join(parts)
        if key in seen and not (member.isdir() and seen[key].isdir()):
            raise _refuse(member, "appears twice in the archive", tar_path)
        seen[key] = member
    if top is None:
        raise EdgekitError("the archive is empty", where=str(tar_path), how=_HOW_ARCHIVE)
    for key in seen:
        parts = key.split("/")
        for end in range(1, len(parts)):
            parent = seen.get("/".join(parts[:end]))
            if parent is not None and not parent.isdir():
                raise _refuse(key, f"is below {parent.name!r}, which is a file", tar_path)
    return top


class _HeaderBound(io.RawIOBase):
    """A read-only view of the archive stream that refuses any single read larger than
    :data:`_MAX_HEADER_READ`: tarfile reads a pax or GNU long-name header in one call of the
    size the header claims, so a hostile header claiming gigabytes would be read into memory."""

    def __init__(self, raw: Any):
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_HEADER_READ:
            raise tarfile.ReadError(f"a header or read of {size} bytes (more than {_MAX_HEADER_READ})")
        return self._raw.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _open_stream(tar_path: Path) -> Any:
    """The archive's uncompressed byte stream (plain tar, .gz, .bz2 or .xz), header-bounded."""
    raw = open(tar_path, "rb")
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
    elif magic[:3] == b"BZh":
        stream = bz2.BZ2File(raw, mode="rb")
    elif magic == b"\xfd7zXZ\x00":
        stream = lzma.LZMAFile(raw, mode="rb")
    else:
        stream = raw
    return raw, stream, _HeaderBound(stream)


def _read_members(tar: tarfile.TarFile, tar_path: Path) -> list[tarfile.TarInfo]:
    members = []
    try:
        while True:
            member = tar.next()
            if member is None:
                break
            members.append(member)
            if len(members) > MAX_MEMBERS:
                raise EdgekitError(f"the archive has more than {MAX_MEMBERS} members (a bundle has a few dozen files)",
                                   where=str(tar_path), how=_HOW_ARCHIVE)
    except (tarfile.TarError, OSError, EOFError, EdgekitError) as exc:
        if isinstance(exc, EdgekitError):
            raise
        raise EdgekitError(f"the archive is damaged or truncated ({exc})", where=str(tar_path), how=_HOW_ARCHIVE) from None
    return members


def _read_manifest_member(tar: tarfile.TarFile, member: tarfile.TarInfo | None, top: str, tar_path: Path) -> dict[str, Any]:
    if member is None or not member.isreg():
        raise EdgekitError(f"the archive has no {top}/{MANIFEST_NAME}", where=str(tar_path),
                           how="unpack only bundle archives written by `edgekit compress`")
    if member.size > MAX_MANIFEST_BYTES:
        raise _refuse(member, f"declares {member.size} bytes (a manifest is at most {MAX_MANIFEST_BYTES})", tar_path)
    try:
        handle = tar.extractfile(member)
        data = handle.read(member.size) if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EdgekitError(f"the archive is damaged or truncated ({exc})", where=str(tar_path), how=_HOW_ARCHIVE) from None
    if len(data) != member.size:
        raise EdgekitError(f"the archive is damaged or truncated ({member.name} is short)", where=str(tar_path),
                           how="download or copy the archive again")
    from edgekit.bundle.manifest import parse_manifest

    # the same checks as a bundle directory's manifest.json (edgekit.bundle.manifest)
    manifest = parse_manifest(data, where=f"{tar_path}: {top}/{MANIFEST_NAME}").raw
    return manifest


def plan_members(members: list[tarfile.TarInfo], top: str, files: dict[str, dict[str, Any]],
                 tar_path: Path) -> list[tuple[tarfile.TarInfo, str]]:
    """(member, bundle-relative path) of every member to write, after checking each file's
    declared size against the manifest's table (refusing, by name, a file the table does not
    list or whose size differs) and that every listed file is in the archive."""
    planned: list[tuple[tarfile.TarInfo, str]] = []
    present: set[str] = set()
    for member in members:
        parts = _parts(member.name)
        rel = "/".join(parts[1:])
        if not rel:
            continue
        if member.isdir():
            if rel in files:
                raise _refuse(member, "is a directory where the manifest lists a file", tar_path)
            planned.append((member, rel))
            continue
        if rel == MANIFEST_NAME:
            pass
        elif rel in files:
            expected = files[rel]["size"]
            if member.size != expected:
                raise _refuse(member, f"declares {member.size} bytes, but the manifest says {expected}", tar_path)
        elif rel == SIGNATURE_NAME:
            if member.size > MAX_SIGNATURE_BYTES:
                raise _refuse(member, f"declares {member.size} bytes (a signature is at most {MAX_SIGNATURE_BYTES})", tar_path)
        else:
            raise _refuse(member, "is not in the manifest's file table", tar_path)
        present.add(rel)
        planned.append((member, rel))
    missing = sorted(rel for rel in files if rel not in present)
    if missing:
        raise EdgekitError(f"{missing[0]} is listed in manifest.json but not in the archive", where=str(tar_path),
                           how="download or copy the archive again, or re-create it from the bundle directory")
    return planned


# --------------------------------------------------------------------------- temporary directories


def clean_stale_unpack_dirs(dest_dir: Path, *, now: float | None = None) -> list[Path]:
    """Remove the temporary directories that killed unpacks left in ``dest_dir``: only
    ``.edgekit-unpack-<pid>-<random>`` ones of this user whose process is gone (or older than
    :data:`STALE_AFTER_S`); nothing else is touched (:func:`edgekit.names.clean_stale_temp_dirs`)."""
    return clean_stale_temp_dirs(dest_dir, UNPACK_TEMP_PREFIX, now=now, stale_after_s=STALE_AFTER_S)


# --------------------------------------------------------------------------- extraction


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, expected: str | None,
                  tar_path: Path, rel: str) -> None:
    """Stream one file member to ``path`` (a new file), hashing it; refuse as soon as it is known
    to differ from the manifest's sha256."""
    handle = tar.extractfile(member)
    if handle is None:
        raise _refuse(member, "has no data", tar_path)
    mode = 0o755 if member.mode & 0o100 else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    digest = hashlib.sha256()
    remaining = member.size
    with os.fdopen(fd, "wb") as out:
        while remaining > 0:
            try:
                chunk = handle.read(min(_CHUNK, remaining))
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise EdgekitError(f"the archive is damaged or truncated ({exc})", where=str(tar_path),
                                   how=_HOW_ARCHIVE) from None
            if not chunk:
                raise EdgekitError(f"the archive is damaged or truncated ({member.name} is short)", where=str(tar_path),
                                   how="download or copy the archive again")
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    os.chmod(path, mode)
    if expected is not None and digest.hexdigest() != expected:
        raise EdgekitError(f"{rel} does not match its sha256 in manifest.json", where=f"{tar_path}: {member.name}",
                           how="download or copy the archive again from its source")
    os.utime(path, (member.mtime, member.mtime))


def safe_extract(tar_path: str | Path, dest_dir: str | Path, *, check: Callable[[Path], Any] | None = None,
                 max_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Extract a bundle archive to ``dest_dir/<top directory>`` and return that path.

    Every member is checked first against the rules and the archive's own manifest (see the
    module doc); files are written into a temporary directory in ``dest_dir``, each checked
    against its sha256 as it is streamed, and the bundle is renamed into place only after
    ``check(extracted_dir)`` (if given) returned; on any failure nothing is left behind.
    Refuses an existing target and a bundle over ``max_bytes``."""
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    if not tar_path.is_file():
        raise EdgekitError("bundle archive not found", where=str(tar_path), how="pass the .tar written by `edgekit compress`")
    try:
        raw, stream, bounded = _open_stream(tar_path)
    except OSError as exc:
        raise EdgekitError(f"cannot read the archive ({exc.strerror or exc})", where=str(tar_path), how=_HOW_ARCHIVE) from None
    try:
        try:
            tar = tarfile.open(fileobj=bounded, mode="r:")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise EdgekitError(f"not a readable tar archive ({exc})", where=str(tar_path), how=_HOW_ARCHIVE) from None
        with tar:
            return _extract(tar, bounded, tar_path, dest_dir, check, max_bytes)
    finally:
        stream.close()
        raw.close()


def _extract(tar: tarfile.TarFile, stream: Any, tar_path: Path, dest_dir: Path, check: Callable[[Path], Any] | None,
             max_bytes: int) -> Path:
    members = _read_members(tar, tar_path)
    # tarfile takes a cut at a header boundary for the end of the archive: a truncated
    # download would extract as a smaller, "valid" archive. The end-of-archive marker (a
    # zero block) must follow the last member.
    try:
        stream.seek(tar.offset)
        end = stream.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, tarfile.TarError):
        end = b""
    if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
        last = members[-1].name if members else "the start"
        raise EdgekitError(f"the archive is damaged or truncated (no end-of-archive marker after {last!r})",
                           where=str(tar_path), how="download or copy the archive again")
    top = check_members(members, tar_path)
    by_name = {"/".join(_parts(m.name)): m for m in members}
    manifest = _read_manifest_member(tar, by_name.get(f"{top}/{MANIFEST_NAME}"), top, tar_path)
    files = check_file_table(manifest.get("files"), where=f"{tar_path}: {top}/{MANIFEST_NAME}", how=_HOW_ARCHIVE)
    planned = plan_members(members, top, files, tar_path)
    needed = sum(m.size for m, _ in planned if m.isreg())
    if needed > max_bytes:
        raise EdgekitError(f"the bundle declares {needed / 1e6:.1f} MB, more than this unpack allows "
                           f"({max_bytes / 1e6:.1f} MB)", where=str(tar_path), how=_HOW_ARCHIVE)
    final = dest_dir / top
    if final.exists() or final.is_symlink():
        raise OutputError(f"{top} already exists in the destination", where=str(final),
                          how="remove it or unpack elsewhere (a bundle is never overwritten in place)")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_unpack_dirs(dest_dir)
        free = shutil.disk_usage(dest_dir).free
        if needed > free:
            raise OutputError(f"out of space: the bundle needs {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free",
                              where=str(dest_dir), how="free space or unpack elsewhere")
        tmp = Path(tempfile.mkdtemp(prefix=f"{UNPACK_TEMP_PREFIX}{os.getpid()}-", dir=dest_dir))
    except OSError as exc:
        raise OutputError(f"cannot write the destination ({exc.strerror or exc})", where=str(dest_dir),
                          how="choose a directory you can write") from None
    try:
        root = tmp / top
        root.mkdir(mode=0o755)
        try:
            for member, rel in planned:
                path = root / rel
                if member.isdir():
                    path.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                expected = files[rel]["sha256"] if rel in files else None
                _write_member(tar, member, path, expected, tar_path, rel)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OutputError(f"out of space while unpacking: the bundle needs {needed / 1e6:.1f} MB",
                                  where=str(dest_dir), how="free space or unpack elsewhere") from None
            raise OutputError(f"cannot extract the archive ({exc.strerror or exc})", where=str(dest_dir),
                              how="check free space and permissions there") from None
        if check is not None:
            check(root)
        if final.exists() or final.is_symlink():  # appeared while extracting
            raise OutputError(f"{top} already exists in the destination", where=str(final),
                              how="remove it or unpack elsewhere")
        require_inside(root, tmp, what="the unpacked bundle")
        require_inside(final, dest_dir, what="the unpacked bundle's destination")
        os.rename(root, final)
    finally:
        shutil.rmtree(require_inside(tmp, dest_dir, what="the unpack's temporary directory"), ignore_errors=True)
    return final


def verify_manifest_files(bundle_dir: Any) -> tuple[int, int]:
    """(files, bytes) after checking every file in the manifest's table exists with its size
    and sha256 (streamed), and that no other file is there (``manifest.json`` and
    ``signature.json`` aside). Raises :class:`EdgekitError` naming the first mismatch. This is
    integrity against accidents (a truncated copy, a flipped bit), not authenticity: anyone
    can rewrite a manifest; signatures (:mod:`edgekit.bundle.signing`) are for that."""
    from edgekit.bundle.manifest import Bundle
    from edgekit.hashing import sha256_file

    bundle = Bundle.open(bundle_dir)
    bundle_dir, path = bundle.dir, bundle.manifest_path
    files = bundle.manifest.files
    check_file_table(files, where=str(path))
    how = "copy or unpack the bundle again from its source"
    listing = bundle_listing(bundle_dir)
    for rel in listing:
        if rel not in files and rel not in ("manifest.json", SIGNATURE_NAME):
            raise EdgekitError(f"{rel} is not in the manifest's file table", where=str(bundle_dir / rel), how=how)
    present = set(listing)
    for rel, meta in files.items():
        file = bundle_dir / rel
        if rel not in present:
            raise EdgekitError(f"{rel} is missing (the manifest lists it)", where=str(file), how=how)
        if file.stat().st_size != meta.get("size") or sha256_file(file) != meta.get("sha256"):
            raise EdgekitError(f"{rel} does not match its sha256 in manifest.json", where=str(file), how=how)
    return len(files), sum(int(meta.get("size", 0)) for meta in files.values())
