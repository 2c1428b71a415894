"""The one rule for names that become part of a path, and the check that a path stays inside
its root.

A name comes from a recipe (``name``, stage ``name``), a target YAML, a manifest, a
runtime.json, a tar member, a deploy version or a CLI option; each of those becomes a
directory or file name somewhere. One rule for all of them, checked where the name enters:

    letters, digits, '.', '_' and '-'; starting with a letter or digit; at most 128 characters

That excludes '/', '\\', NUL, '..' as a component, absolute paths, leading dots (hidden files,
'.' and '..') and a leading '-' (read as an option by ssh, rsync and tar).

:func:`require_inside` is the second line of defence: every path the pipeline deletes or
renames is checked to lie inside its root before anything is touched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from edgekit.errors import EdgekitError, OutputError

SAFE_NAME_MAX = 128
SAFE_NAME_RULE = "letters, digits, '.', '_' and '-' only, starting with a letter or digit, at most 128 characters"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a safe name, or None when it is."""
    if not isinstance(value, str):
        return f"a name must be a string, not {type(value).__name__}"
    if not value:
        return "the name is empty"
    if len(value) > SAFE_NAME_MAX:
        return f"the name is {len(value)} characters long (at most {SAFE_NAME_MAX})"
    if "\x00" in value:
        return "the name contains a NUL byte"
    if "/" in value or "\\" in value:
        return "the name contains a path separator"
    if value.startswith("."):
        return "the name starts with a dot"
    if not _SAFE_NAME.fullmatch(value):
        return f"the name {shown(value)} has characters outside the rule ({SAFE_NAME_RULE})"
    return None


def shown(value: str, limit: int = 40) -> str:
    """``value`` as it goes into a one-line message: ASCII-escaped (a control character or a
    right-to-left mark cannot disguise it) and cut to ``limit`` characters."""
    text = ascii(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_name(value: Any, *, what: str, where: str | None = None,
               error_cls: type[EdgekitError] = EdgekitError) -> str:
    """``value`` if it is a safe name, else a one-line ``error_cls`` naming ``what``."""
    problem = name_problem(value)
    if problem is not None:
        raise error_cls(f"invalid {what}: {problem}", where=where,
                        how=f"use {SAFE_NAME_RULE}")
    return value


def _pydantic_safe_name(value: str) -> str:
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(f"{problem}; use {SAFE_NAME_RULE}")
    return value


def __getattr__(attr: str) -> Any:
    # ``SafeName`` (a pydantic field type: a string that passes :func:`name_problem`) is built
    # on first use, so that the runtime, which needs only check_name, never imports pydantic.
    if attr == "SafeName":
        from pydantic import AfterValidator

        value = Annotated[str, AfterValidator(_pydantic_safe_name)]
        globals()["SafeName"] = value
        return value
    raise AttributeError(attr)


def _location(path: Path | str) -> Path:
    """Where ``path`` itself is: its folder resolved (symlinks followed), its last component not
    followed: removing or renaming a link acts on the link, not on what it points to."""
    path = Path(os.path.abspath(path))
    return Path(os.path.normpath(os.path.join(os.path.realpath(path.parent), path.name)))


def is_inside(path: Path | str, root: Path | str) -> bool:
    """Whether ``path`` lies inside ``root`` (or is ``root``), folders' symlinks followed."""
    try:
        if "\x00" in str(path):
            return False
        location, base = _location(path), Path(os.path.realpath(root))
    except (OSError, ValueError):
        return False
    return location == base or base in location.parents


def require_inside(path: Path | str, root: Path | str, *, what: str = "path") -> Path:
    """``path`` if it lies strictly inside ``root``; else an :class:`OutputError` before
    anything is deleted or renamed. A path equal to its root is refused too: no operation
    here may remove the root itself."""
    path = Path(path)
    if not is_inside(path, root) or _location(path) == Path(os.path.realpath(root)):
        raise OutputError(
            f"refusing to modify {what} outside its folder",
            where=f"{path} (expected inside {root})",
            how="check the names in the recipe, target or bundle: a name must not contain '/', '..' or start with '.'",
        )
    return path


MAX_PATH_CHARS = 1024  # a relative path inside a bundle or run folder
MAX_PATH_DEPTH = 16


def relative_path_problem(rel: Any) -> str | None:
    """Why ``rel`` is not a normalized relative path (as a bundle's manifest, runtime.json or
    engine record names its files), or None when it is: '/'-separated components that each
    pass :func:`name_problem`, at most MAX_PATH_DEPTH deep and MAX_PATH_CHARS long."""
    if not isinstance(rel, str):
        return f"a path must be a string, not {type(rel).__name__}"
    if not rel:
        return "the path is empty"
    if len(rel) > MAX_PATH_CHARS:
        return f"the path is {len(rel)} characters long (at most {MAX_PATH_CHARS})"
    if "\x00" in rel:
        return "the path contains a NUL byte"
    if "\\" in rel:
        return "the path contains a backslash"
    if rel.startswith("/"):
        return "the path is absolute"
    parts = rel.split("/")
    if any(part in ("..", ".") for part in parts):
        return "the path has a '.' or '..' component"
    if any(part == "" for part in parts):
        return "the path is not normalized (an empty component: '//' or a trailing '/')"
    if len(parts) > MAX_PATH_DEPTH:
        return f"the path is {len(parts)} levels deep (at most {MAX_PATH_DEPTH})"
    for part in parts:
        problem = name_problem(part)
        if problem is not None:
            return f"component {shown(part)}: {problem}"
    return None


def check_relative_path(rel: Any, *, what: str, where: str | None = None,
                        error_cls: type[EdgekitError] = EdgekitError,
                        how: str = "rebuild the bundle (edgekit compress); bundle paths are relative, without '..'") -> str:
    """``rel`` if :func:`relative_path_problem` finds nothing, else one line naming ``what``."""
    problem = relative_path_problem(rel)
    if problem is not None:
        name = shown(rel) if isinstance(rel, str) else type(rel).__name__
        raise error_cls(f"invalid {what} {name}: {problem}", where=where, how=how)
    return rel


def path_inside(root: Path | str, rel: Any, *, what: str, where: str | None = None,
                error_cls: type[EdgekitError] = EdgekitError,
                how: str = "rebuild the bundle (edgekit compress); bundle paths are relative, without '..'") -> Path:
    """``root / rel`` for a relative path a file supplied, checked where it enters: the
    :func:`relative_path_problem` rule, and inside ``root`` once symlinks are followed."""
    path = Path(root) / check_relative_path(rel, what=what, where=where, error_cls=error_cls, how=how)
    if not is_inside(os.path.realpath(path), root):
        raise error_cls(f"invalid {what} {shown(rel)}: it leads outside its folder (a symbolic link)", where=where, how=how)
    return path


def remove_tree(path: Path | str, *, root: Path | str, what: str = "folder") -> None:
    """``shutil.rmtree(path)`` once ``path`` is checked to lie inside ``root`` (missing: nothing)."""
    import shutil

    path = Path(path)
    if not os.path.lexists(path):
        return
    require_inside(path, root, what=what)
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)  # a link is removed, never followed
    else:
        shutil.rmtree(path, ignore_errors=True)


def rename_inside(src: Path | str, dst: Path | str, *, root: Path | str) -> None:
    """``os.rename(src, dst)`` once both are checked to lie inside ``root``."""
    require_inside(src, root, what="source")
    require_inside(dst, root, what="destination")
    os.rename(src, dst)


STALE_AFTER_S = 24 * 3600  # a temp folder whose process still runs is left alone this long


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def clean_stale_temp_dirs(base: Path | str, prefix: str, *, now: float | None = None,
                          stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temp folders that killed edgekit processes left in ``base``: only folders
    named ``<prefix><pid>-<random>`` (no link), owned by this user, whose process is gone or
    that are older than ``stale_after_s``; never this process's own. Nothing else is touched.
    Returns what was removed."""
    import re
    import shutil
    import time

    pattern = re.compile(re.escape(prefix) + r"(\d+)-[a-z0-9_]+")
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        pid = int(match.group(1))
        if info.st_uid != os.getuid() or pid == os.getpid():
            continue
        if _pid_alive(pid) and now - info.st_mtime < stale_after_s:
            continue
        path = require_inside(Path(entry.path), base, what="a stale temp folder")
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


__all__ = ["STALE_AFTER_S", "clean_stale_temp_dirs", "MAX_PATH_CHARS", "MAX_PATH_DEPTH", "check_relative_path", "path_inside", "relative_path_problem",
           "remove_tree", "rename_inside", "SAFE_NAME_MAX", "SAFE_NAME_RULE", "SafeName", "check_name", "is_inside", "name_problem", "require_inside", "shown"]
