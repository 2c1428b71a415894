"""Safe extraction of a bundle's ``.tar`` and the check of its files against the manifest.

A bundle archive is what :func:`edgekit.bundle.writer.write_tar` writes: one top directory
(the bundle's name) holding regular files and directories, nothing else. Anything else is
refused before a byte is written, with the member named:

* an absolute name, a ``..`` component, members outside the single top directory;
* any link. Symbolic or hard links that leave the bundle are the classic way a tar writes
  outside its destination; links that stay inside are refused too, because ``write_tar``
  never produces one (a bundle's files are copies), so a link means the archive did not come
  from edgekit, and a link inside a bundle makes "the file that was verified" and "the file
  that is loaded" two different things;
* device nodes, FIFOs and other special members; a name that appears twice; a member below a
  name that is a file.

Extraction goes to a temporary directory beside the destination (Python's ``filter="data"``
as a second layer: it also strips setuid/setgid and group/other write bits), an optional
check runs on the extracted bundle, and only then is it renamed into place: an interrupted,
malformed or failing unpack leaves nothing at the destination.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import EdgekitError, OutputError

_HOW_ARCHIVE = "use the .tar written by `edgekit compress` (or re-create it from the bundle directory); do not unpack this file"


def _refuse(member: tarfile.TarInfo | str, what: str, tar_path: Path) -> EdgekitError:
    name = member.name if isinstance(member, tarfile.TarInfo) else member
    return EdgekitError(f"unsafe bundle archive: member {name!r} {what}", where=str(tar_path), how=_HOW_ARCHIVE)


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


def check_members(members: list[tarfile.TarInfo], tar_path: Path) -> str:
    """The archive's single top directory; raises naming the first member that is not a
    plain file or directory inside it."""
    top: str | None = None
    seen: dict[str, tarfile.TarInfo] = {}
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
        if not (member.isreg() or member.isdir()):
            raise _refuse(member, f"is not a regular file or directory (tar type {member.type!r})", tar_path)
        if not parts:
            if member.isdir():  # "./": the archive root itself, as `tar -C dir .` writes it
                continue
            raise _refuse(member, "has an empty name", tar_path)
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


def safe_extract(tar_path: str | Path, dest_dir: str | Path, *, check: Callable[[Path], Any] | None = None) -> Path:
    """Extract a bundle archive to ``dest_dir/<top directory>`` and return that path.

    Every member is checked first (see the module doc); extraction goes to a temporary
    directory in ``dest_dir`` and is renamed into place only after ``check(extracted_dir)``
    (if given) returned; on any failure nothing is left behind. Refuses an existing target."""
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    if not tar_path.is_file():
        raise EdgekitError("bundle archive not found", where=str(tar_path), how="pass the .tar written by `edgekit compress`")
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise EdgekitError(f"not a readable tar archive ({exc})", where=str(tar_path), how=_HOW_ARCHIVE) from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise EdgekitError(f"the archive is damaged or truncated ({exc})", where=str(tar_path), how=_HOW_ARCHIVE) from None
        # tarfile takes a cut at a header boundary for the end of the archive: a truncated
        # download would extract as a smaller, "valid" archive. The end-of-archive marker (a
        # zero block) must follow the last member.
        tar.fileobj.seek(tar.offset)
        end = tar.fileobj.read(tarfile.BLOCKSIZE)
        if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
            last = members[-1].name if members else "the start"
            raise EdgekitError(f"the archive is damaged or truncated (no end-of-archive marker after {last!r})",
                               where=str(tar_path), how="download or copy the archive again")
        top = check_members(members, tar_path)
        final = dest_dir / top
        if final.exists() or final.is_symlink():
            raise OutputError(f"{top} already exists in the destination", where=str(final),
                              how="remove it or unpack elsewhere (a bundle is never overwritten in place)")
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{top}.unpack-", dir=dest_dir))
        except OSError as exc:
            raise OutputError(f"cannot write the destination ({exc.strerror or exc})", where=str(dest_dir),
                              how="choose a directory you can write") from None
        try:
            needed = sum(m.size for m in members if m.isreg())
            free = shutil.disk_usage(tmp).free
            if needed > free:
                raise OutputError(f"the bundle needs {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free",
                                  where=str(dest_dir), how="free space or unpack elsewhere")
            try:
                # second layer: the stdlib's own checks (also strips setuid/setgid, group/other write)
                tar.extractall(tmp, members=members, filter="data")
            except tarfile.FilterError as exc:
                member = getattr(exc, "tarinfo", None) or "?"
                raise _refuse(member, f"was refused by tarfile's data filter ({exc})", tar_path) from None
            except (tarfile.TarError, EOFError) as exc:
                raise EdgekitError(f"the archive is damaged or truncated ({exc})", where=str(tar_path),
                                   how=_HOW_ARCHIVE) from None
            except OSError as exc:
                raise OutputError(f"cannot extract the archive ({exc.strerror or exc})", where=str(dest_dir),
                                  how="check free space and permissions there") from None
            if check is not None:
                check(tmp / top)
            if final.exists() or final.is_symlink():  # appeared while extracting
                raise OutputError(f"{top} already exists in the destination", where=str(final),
                                  how="remove it or unpack elsewhere")
            os.rename(tmp / top, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def verify_manifest_files(bundle_dir: str | Path) -> tuple[int, int]:
    """(files, bytes) after checking every file in the manifest's table exists with its size
    and sha256 (streamed), and that no other file is there (``manifest.json`` and
    ``signature.json`` aside). Raises :class:`EdgekitError` naming the first mismatch. This is
    integrity against accidents (a truncated copy, a flipped bit), not authenticity: anyone
    can rewrite a manifest; signatures (:mod:`edgekit.bundle.signing`) are for that."""
    from edgekit.bundle.signing import SIGNATURE_NAME, bundle_listing
    from edgekit.hashing import sha256_file

    bundle_dir = Path(bundle_dir)
    path = bundle_dir / "manifest.json"
    if not path.is_file():
        raise EdgekitError("not a bundle (no manifest.json)", where=str(bundle_dir),
                           how="pass a bundle written by `edgekit compress`")
    try:
        files = json.loads(path.read_text()).get("files")
    except (ValueError, AttributeError):
        files = None
    if not isinstance(files, dict) or not files:
        raise EdgekitError("manifest.json has no file table", where=str(path), how="rebuild the bundle (edgekit compress)")
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
