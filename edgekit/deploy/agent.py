"""The program edgekit runs on the device: the remote side of a deploy's master ssh connection.

This file is sent as it is (``python3 -c <this file + _serve(root)>``), so it must stay
self-contained: standard library only (the device may not have edgekit yet), no imports from
edgekit, and syntax that Python 3.8 can parse (so that an old interpreter gets a clear message
from ``probe`` rather than a SyntaxError). It holds the device's deploy lock and answers one
JSON request per line on stdin with one line ``edgekit-agent-result {json}`` on stdout: every
step costs a line on an open connection, not a new ssh session.

Remote layout under ``root`` (see docs/deploy.md)::

    bundles/<name>/<version>/            a verified bundle; never modified once renamed into place
    bundles/<name>/.incoming/<version>/  upload target (rsync --partial-dir: resumes)
    bundles/<name>/.records/<version>.json   sha256 of the version's manifest.json (+ signature.json), when, by what
    bundles/<name>/.quarantine/<version>-<utc>/  a version that failed verification, kept for inspection
    bundles/<name>/current -> <version>  switched atomically (symlink to a temp name + rename)
    bundles/<name>/previous -> <version> what current pointed to before (edgekit deploy --rollback)
    runtime/<edgekit version>-<source hash>/   edgekit installed with pip --target
    reports/<name>/<version>/            validate reports
    bin/edgekit                          wrapper: PYTHONPATH=<runtime> exec <python> -m edgekit "$@"
"""

import errno
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time

MARK = "edgekit-agent-result "
# Names that become paths here are checked as strictly as edgekit.names.check_name (this
# file cannot import edgekit): letters, digits, '.', '_', '-', starting with a letter or
# digit, at most 128 characters; a bundle-relative path is such names joined by '/', at
# most 16 deep and 1024 characters. Always fullmatch: '$' would let a trailing newline in.
SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_RE = re.compile(r"[0-9a-f]{12}(-engine)?")
MAX_REL_PATH = 1024
MAX_DEPTH = 16
# Temporary entries this agent writes (a killed agent leaves them): <name>.tmp-<pid>, .trash-<name>-<pid>.
_TEMP_RE = re.compile(r"(?:\.trash-.+-|.+\.tmp-)(\d+)")
PARTIAL_DIR = ".rsync-partial"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
KEEP_QUARANTINED = 2
KEEP_RUNTIMES = 3


class Refused(Exception):
    """A request this agent will not carry out (an unsafe name or path)."""


SERVED_ROOT = None  # set by _serve: every payload's root must be this one


def _is_version(value):
    return isinstance(value, str) and VERSION_RE.fullmatch(value) is not None


def _safe_name(value, what):
    if not isinstance(value, str) or SAFE_NAME_RE.fullmatch(value) is None:
        raise Refused(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only, starting with a letter or "
                      "digit, at most 128 characters")
    return value


def _safe_rel(value, what="file name"):
    ok = isinstance(value, str) and 0 < len(value) <= MAX_REL_PATH
    parts = value.split("/") if ok else []
    if not ok or len(parts) > MAX_DEPTH or not all(SAFE_NAME_RE.fullmatch(part) for part in parts):
        raise Refused(f"invalid {what} {value!r}: a relative path of safe names (no '..', no leading '/' or '.')")
    return value


def _version(value, what="version"):
    if not _is_version(value):
        raise Refused(f"invalid {what} {value!r}")
    return value


def _inside(path, base):
    """``path`` if it lies strictly inside ``base`` (symbolic links resolved); else Refused,
    before anything is deleted or renamed."""
    real, real_base = os.path.realpath(path), os.path.realpath(base)
    if "\x00" in path or real == real_base or not real.startswith(real_base.rstrip(os.sep) + os.sep):
        raise Refused(f"refusing to modify {path!r}: it is not inside {base!r}")
    return path


def _root(p):
    root = p.get("root")
    if not isinstance(root, str) or root != SERVED_ROOT:
        raise Refused(f"root {root!r} is not the root this agent serves ({SERVED_ROOT!r})")
    return root


def _bundle_dir(p):
    return os.path.join(_root(p), "bundles", _safe_name(p.get("name"), "bundle name"))


def _free_bytes(path):
    """Free bytes for an unprivileged writer on the filesystem that holds ``path`` (or its
    deepest existing parent)."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _clean_stale(directory):
    """Remove what killed agents left in ``directory``: only entries named like this agent's
    temporary files (``<name>.tmp-<pid>``, ``.trash-<name>-<pid>``) whose process is gone."""
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.fullmatch(entry)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        full = os.path.join(directory, entry)
        if os.path.islink(full) or not os.path.isdir(full):
            os.unlink(full)  # the entry itself (a link is removed, never followed)
        else:
            shutil.rmtree(_inside(full, directory), ignore_errors=True)
        removed.append(entry)
    return removed


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_json(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _link(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _switch(bundle_dir, link, target):
    """Point ``bundle_dir/link`` at ``target`` atomically: a reader sees the old or the new link, never none."""
    _version(target, "link target")
    tmp = os.path.join(bundle_dir, f".{link}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, os.path.join(bundle_dir, link))
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _remove_tree(path, base):
    """Rename aside first, so a half-deleted directory never looks like a valid one. ``path``
    must lie inside ``base`` (checked before anything is touched)."""
    if not os.path.lexists(path):
        return
    _inside(path, base)
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{os.getpid()}")
    os.rename(path, _inside(trash, base))
    shutil.rmtree(trash, ignore_errors=True)


def _versions(bundle_dir):
    try:
        names = os.listdir(bundle_dir)
    except OSError:
        return []
    return sorted(n for n in names if _is_version(n) and os.path.isdir(os.path.join(bundle_dir, n))
                  and not os.path.islink(os.path.join(bundle_dir, n)))


def _record_path(bundle_dir, version):
    return os.path.join(bundle_dir, ".records", _version(version) + ".json")


def _current_version(bundle_dir, link):
    """What ``link`` (current/previous) points to, when it is a version name; else None."""
    target = _link(os.path.join(bundle_dir, link))
    return target if _is_version(target) else None


def _tail(text, lines=3):
    kept = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


# --- operations -----------------------------------------------------------------------------


def probe(p):
    """Everything a deploy needs to know about the device, in one round trip."""
    root, bundle_dir = _root(p), _bundle_dir(p)
    version = _version(p.get("version"))
    runtime_dir = os.path.join(root, "runtime", _safe_name(p.get("runtime_key"), "runtime key"))
    modules = p.get("modules") or {}
    if not all(isinstance(k, str) and SAFE_NAME_RE.fullmatch(k) and isinstance(v, str) for k, v in modules.items()):
        raise Refused("invalid module names")
    wrapper = os.path.join(root, "bin", "edgekit")
    active = None
    try:
        with open(wrapper, encoding="utf-8") as handle:
            match = re.search(r"^# runtime: (\S+)$", handle.read(), re.M)
            active = match.group(1) if match else None
    except OSError:
        pass
    setuptools_version = None
    try:
        import importlib.metadata as metadata

        setuptools_version = metadata.version("setuptools")
    except Exception:
        pass
    versions = _versions(bundle_dir)
    return {
        "ok": True,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_ok": sys.version_info >= (3, 10),
        "executable": sys.executable,
        "rsync": shutil.which("rsync") is not None,
        "versions": versions,
        "current": _current_version(bundle_dir, "current"),
        "previous": _current_version(bundle_dir, "previous"),
        "version_exists": version in versions,
        "record": _read_json(_record_path(bundle_dir, version)),
        "runtime_installed": os.path.isfile(os.path.join(runtime_dir, "edgekit", "__init__.py")),
        "runtime_fastpath": bool(glob.glob(os.path.join(glob.escape(runtime_dir), "edgekit", "runtime", "_fastpath*.so"))),
        "runtime_active": active,
        "missing_modules": sorted(pip for module, pip in modules.items() if importlib.util.find_spec(module) is None),
        "pip": importlib.util.find_spec("pip") is not None,
        "setuptools": setuptools_version,
        "free_bytes": _free_bytes(bundle_dir),
    }


def verify(p):
    """Every file of ``dir`` against its manifest.json's ``files`` table (sha256 + size).

    ``manifest_sha256``: the manifest must hash to this (None: any, e.g. after build-engine
    rewrote it). ``signature_sha256``: signature.json must hash to this; None: must be absent;
    "any": may be present. Files not in the table (besides those two), links and missing
    files fail. Reports the first failing file."""
    root = _inside(p.get("dir") or "", os.path.join(_root(p), "bundles"))
    if not os.path.isdir(root):
        return {"ok": False, "error": "the directory is missing", "file": None}
    present = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if p.get("skip_partial") and PARTIAL_DIR in dirnames:
            dirnames.remove(PARTIAL_DIR)
        for entry in sorted(dirnames + filenames):
            full = os.path.join(dirpath, entry)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                return {"ok": False, "file": rel, "error": f"{rel}: a symbolic link (bundles hold no links)"}
            if entry in filenames:
                if not os.path.isfile(full):  # a FIFO would block the hashing below
                    return {"ok": False, "file": rel, "error": f"{rel}: not a regular file"}
                present[rel] = full
    if MANIFEST not in present:
        return {"ok": False, "file": MANIFEST, "error": "manifest.json is missing"}
    manifest_sha = _sha256(present[MANIFEST])
    if p.get("manifest_sha256") and manifest_sha != p["manifest_sha256"]:
        error = f"manifest.json: sha256 mismatch (expected {p['manifest_sha256'][:12]}..., found {manifest_sha[:12]}...)"
        return {"ok": False, "file": MANIFEST, "error": error}
    manifest = _read_json(present[MANIFEST])
    table = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(table, dict):
        return {"ok": False, "file": MANIFEST, "error": "manifest.json has no files table"}
    for rel, meta in table.items():
        try:
            _safe_rel(rel, "file name in manifest.json")
        except Refused as exc:
            return {"ok": False, "file": MANIFEST, "error": str(exc)}
        size = meta.get("size") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(meta.get("sha256"), str):
            return {"ok": False, "file": MANIFEST, "error": f"manifest.json: the row for {rel!r} has no valid size and sha256"}
    signature = p.get("signature_sha256")
    allowed = set(table) | {MANIFEST} | ({SIGNATURE} if signature else set())
    for rel in sorted(present):
        if rel not in allowed:
            return {"ok": False, "file": rel, "error": f"{rel}: not in the manifest's files table"}
    for rel in sorted(table):
        if rel not in present:
            return {"ok": False, "file": rel, "error": f"{rel}: missing"}
        size = os.path.getsize(present[rel])
        if size != table[rel].get("size"):
            return {"ok": False, "file": rel, "error": f"{rel}: {size} bytes, the manifest says {table[rel].get('size')}"}
    total = 0
    for rel in sorted(table):
        digest = _sha256(present[rel])
        if digest != table[rel].get("sha256"):
            expected = str(table[rel].get("sha256"))[:12]
            error = f"{rel}: sha256 mismatch (manifest {expected}..., device {digest[:12]}...)"
            return {"ok": False, "file": rel, "error": error}
        total += table[rel]["size"]
    signature_sha = _sha256(present[SIGNATURE]) if SIGNATURE in present else None
    if signature not in (None, "any") and signature_sha != signature:
        what = "missing" if signature_sha is None else "sha256 mismatch"
        return {"ok": False, "file": SIGNATURE, "error": f"signature.json: {what}"}
    return {"ok": True, "files": len(table) + 1 + (signature_sha is not None), "bytes": total,
            "manifest_sha256": manifest_sha, "signature_sha256": signature_sha}


def prepare(p):
    """Create the upload directory; delete what does not belong to this version there (a
    resumed upload keeps its files and rsync's partial files)."""
    root = _root(p)
    incoming = _inside(p.get("dir") or "", root)
    names = set(_safe_rel(name) for name in p.get("names") or ())
    os.makedirs(incoming, exist_ok=True)
    kept = complete = 0
    for dirpath, dirnames, filenames in os.walk(incoming, topdown=False):
        for entry in filenames:
            full = os.path.join(dirpath, entry)
            rel = os.path.relpath(full, incoming).replace(os.sep, "/")
            parts = rel.split("/")
            if PARTIAL_DIR in parts:
                parts.remove(PARTIAL_DIR)
            if "/".join(parts) in names and not os.path.islink(full):
                kept += os.path.getsize(full)
                if PARTIAL_DIR not in rel.split("/"):
                    complete += os.path.getsize(full)
            else:
                os.unlink(_inside(full, incoming))  # rsync temp files of a killed upload, other versions' files
        for entry in dirnames:
            full = os.path.join(dirpath, entry)
            if os.path.islink(full):
                os.unlink(full)
            elif not os.listdir(_inside(full, incoming)):
                os.rmdir(full)
    return {"ok": True, "present_bytes": kept, "complete_bytes": complete}


def install_runtime(p):
    """pip install the uploaded sdist into runtime/<key> (via a temp dir + rename), check that
    the C fast path was compiled, and (re)write bin/edgekit to use it."""
    root, key = _root(p), _safe_name(p.get("key"), "runtime key")
    runtime_root = os.path.join(root, "runtime")
    if p.get("sdist"):
        sdist_dir = os.path.join(runtime_root, ".incoming", key)
        _safe_name(os.path.basename(p["sdist"]), "sdist name")
        if os.path.dirname(p["sdist"]) != sdist_dir:
            raise Refused(f"the sdist {p['sdist']!r} is not in {sdist_dir!r}")
    final = os.path.join(runtime_root, key)
    result = {"ok": True, "installed": False}
    os.makedirs(runtime_root, exist_ok=True)
    # An install of an interrupted deploy may still be running here (the device does not stop
    # it when the connection drops): wait for it, then install only if it did not.
    lock = open(os.path.join(runtime_root, ".install.lock"), "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    installed = os.path.isfile(os.path.join(final, "edgekit", "__init__.py"))
    if p.get("sdist") and (p.get("force") or not installed):
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        argv = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
                "--disable-pip-version-check", "--no-cache-dir", "--target", tmp, p["sdist"]]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            shutil.rmtree(_inside(tmp, runtime_root), ignore_errors=True)
            result = {"ok": False, "error": "pip install of the edgekit runtime failed: " + _tail(proc.stdout)}
            if "No space left on device" in proc.stdout or "Errno 28" in proc.stdout:
                result.update(no_space=True, free_bytes=_free_bytes(runtime_root), path=runtime_root)
            return result
        if os.path.exists(final):
            _remove_tree(final, runtime_root)
        os.rename(_inside(tmp, runtime_root), _inside(final, runtime_root))
        shutil.rmtree(_inside(os.path.dirname(p["sdist"]), runtime_root), ignore_errors=True)
        result["installed"] = True
    # cwd "/": Python puts the working directory first on sys.path, and an edgekit/ there must not win.
    env = dict(os.environ, PYTHONPATH=final)
    check = subprocess.run([sys.executable, "-c", "import edgekit.runtime._fastpath"], env=env, cwd="/", stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result["fastpath"] = check.returncode == 0
    if check.returncode != 0:
        include = sysconfig.get_paths().get("include") or ""
        result["fastpath_error"] = _tail(check.stdout, 1)
        result["compiler"] = bool(shutil.which("gcc") or shutil.which("cc"))
        result["python_headers"] = os.path.isfile(os.path.join(include, "Python.h"))
    version = subprocess.run([sys.executable, "-m", "edgekit", "--version"], env=env, cwd="/", stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if version.returncode != 0:
        return {"ok": False, "error": "the installed runtime does not start: " + _tail(version.stdout)}
    result["version"] = version.stdout.strip()
    bin_dir = os.path.join(root, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    wrapper = os.path.join(bin_dir, "edgekit")
    # The runtime goes first on sys.path explicitly: `python -m` would put the caller's working
    # directory first, where another edgekit (a checkout) may be. PYTHONPATH is for subprocesses.
    start = "import sys; sys.path.insert(0, sys.argv.pop(1)); from edgekit.cli import main; main(prog_name='edgekit')"
    text = (f"#!/bin/sh\n# written by edgekit deploy; runtime: {key}\n"
            f"PYTHONPATH={shlex.quote(final)}${{PYTHONPATH:+:$PYTHONPATH}}\nexport PYTHONPATH\n"
            f"exec {shlex.quote(sys.executable)} -c {shlex.quote(start)} {shlex.quote(final)} \"$@\"\n")
    tmp_wrapper = f"{wrapper}.tmp-{os.getpid()}"
    with open(tmp_wrapper, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp_wrapper, 0o755)
    os.replace(tmp_wrapper, wrapper)
    # Keep the active runtime and the newest others; old ones go.
    others = [d for d in glob.glob(os.path.join(glob.escape(runtime_root), "*"))
              if os.path.isdir(d) and os.path.basename(d) != key and not os.path.basename(d).startswith(".")
              and not d.endswith(".tmp")]
    others.sort(key=os.path.getmtime, reverse=True)
    for old in others[KEEP_RUNTIMES - 1:]:
        _remove_tree(old, runtime_root)
    return result


def promote(p):
    """Rename the verified upload into place, record it, switch ``current`` (and ``previous``)
    atomically, then prune old versions (never current, previous or this one)."""
    bundle_dir, version = _bundle_dir(p), _version(p.get("version"))
    keep = p.get("keep")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise Refused(f"invalid keep {keep!r}")
    incoming = os.path.join(bundle_dir, ".incoming", version)
    final = os.path.join(bundle_dir, version)
    result = {"ok": True, "quarantined": None, "removed": []}
    if p["uploaded"]:
        for dirpath, dirnames, _ in os.walk(incoming):
            if PARTIAL_DIR in dirnames:
                shutil.rmtree(_inside(os.path.join(dirpath, PARTIAL_DIR), incoming), ignore_errors=True)
                dirnames.remove(PARTIAL_DIR)
        os.sync()  # the files are on disk before the version can become current (power loss)
        if os.path.exists(final):
            if not p.get("replace"):
                return {"ok": False, "error": f"version {version} appeared on the device during the upload"}
            quarantine = os.path.join(bundle_dir, ".quarantine")
            os.makedirs(quarantine, exist_ok=True)
            target = os.path.join(quarantine, f"{version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            os.rename(_inside(final, bundle_dir), _inside(target, bundle_dir))
            result["quarantined"] = target
        os.rename(_inside(incoming, bundle_dir), _inside(final, bundle_dir))
    os.makedirs(os.path.join(bundle_dir, ".records"), exist_ok=True)
    if p.get("record"):
        _write_json(_record_path(bundle_dir, version), p["record"])
    current = _current_version(bundle_dir, "current")
    if current != version:
        _switch(bundle_dir, "current", version)
        if current:
            _switch(bundle_dir, "previous", current)
    _fsync_dir(bundle_dir)
    result["current"] = version
    result["previous"] = _current_version(bundle_dir, "previous")
    # Keep the newest `keep` versions, and never the one current or previous points to.
    versions = _versions(bundle_dir)
    versions.sort(key=lambda v: (_read_json(_record_path(bundle_dir, v)) or {}).get("deployed_unix")
                  or os.path.getmtime(os.path.join(bundle_dir, v)), reverse=True)
    kept = set(versions[:keep]) | {version, result["previous"]}
    for v in versions:
        if v in kept:
            continue
        _remove_tree(os.path.join(bundle_dir, v), bundle_dir)
        try:
            os.unlink(_record_path(bundle_dir, v))
        except OSError:
            pass
        result["removed"].append(v)
    # Uploads of other versions were abandoned: this one is current now.
    incoming_root = os.path.join(bundle_dir, ".incoming")
    for entry in os.listdir(incoming_root) if os.path.isdir(incoming_root) else []:
        if entry != version and os.path.isdir(os.path.join(incoming_root, entry)) and _is_version(entry):
            _remove_tree(os.path.join(incoming_root, entry), incoming_root)
    quarantine = os.path.join(bundle_dir, ".quarantine")
    if os.path.isdir(quarantine):
        entries = sorted(os.listdir(quarantine), reverse=True)
        for old in entries[KEEP_QUARANTINED:]:
            _remove_tree(os.path.join(quarantine, old), quarantine)
    return result


def rollback(p):
    """Point ``current`` back at ``previous`` (after verifying it) and ``previous`` at the old current."""
    bundle_dir = _bundle_dir(p)
    current = _current_version(bundle_dir, "current")
    target = _version(p["to"], "rollback version") if p.get("to") else _current_version(bundle_dir, "previous")
    if not target:
        return {"ok": False, "error": f"no previous version is recorded for {p['name']} on the device"}
    if target not in _versions(bundle_dir):
        there = ", ".join(_versions(bundle_dir)) or "none"
        return {"ok": False, "error": f"version {target} is not on the device (versions: {there})"}
    record = _read_json(_record_path(bundle_dir, target)) or {}
    check = verify({"root": p["root"], "dir": os.path.join(bundle_dir, target), "manifest_sha256": record.get("manifest_sha256"),
                    "signature_sha256": record.get("signature_sha256")})
    if not check["ok"]:
        return {"ok": False, "error": f"version {target} failed verification: {check['error']}"}
    _switch(bundle_dir, "current", target)
    if current and current != target:
        _switch(bundle_dir, "previous", current)
    _fsync_dir(bundle_dir)
    return {"ok": True, "current": target, "previous": current}


def plan(p):
    """The first step of a deploy, in one round trip: ``probe``; then, when the version is
    already there and its deploy record names this bundle, ``verify`` it; otherwise check the
    free space against what the upload still needs and ``prepare`` its upload directory.

    Temporary entries killed agents left in the bundle's directory are removed first.
    ``assume_free_bytes`` (tests only: EDGEKIT_DEPLOY_TEST_FREE_BYTES on the deploying side)
    replaces the measured free space."""
    result = probe(p)
    bundle_dir = _bundle_dir(p)
    for directory in (bundle_dir, os.path.join(bundle_dir, ".records"), os.path.join(bundle_dir, ".incoming"),
                      os.path.join(bundle_dir, ".quarantine")):
        _clean_stale(directory)
    record = result["record"] or {}
    check = None
    if result["version_exists"]:
        if not record.get("manifest_sha256"):
            check = {"ok": False, "error": "it has no deploy record"}
        elif (record.get("uploaded_manifest_sha256"), record.get("uploaded_signature_sha256")) != (
                p["manifest_sha256"], p["signature_sha256"]):
            check = {"ok": False, "error": "its deploy record names another bundle"}
        else:
            check = verify({"root": p["root"], "dir": os.path.join(bundle_dir, p["version"]),
                            "manifest_sha256": record["manifest_sha256"], "signature_sha256": record.get("signature_sha256")})
    result["existing"] = check
    if not (check and check["ok"]):
        incoming = os.path.join(bundle_dir, ".incoming", p["version"])
        complete = 0
        if os.path.isdir(incoming):  # a resumed upload: what is already there is not needed again
            complete = prepare({"root": p["root"], "dir": incoming, "names": p["names"]})["complete_bytes"]
        total = p.get("bytes")
        if not isinstance(total, int) or total < 0:
            raise Refused(f"invalid bundle size {total!r}")
        needed = max(0, total - complete)
        needed += needed // 20 + (1 << 20)  # 5% and 1 MiB: directories, rsync's temporary files, the records
        free = p["assume_free_bytes"] if isinstance(p.get("assume_free_bytes"), int) else _free_bytes(bundle_dir)
        result["space"] = {"ok": free >= needed, "free_bytes": free, "needed_bytes": needed, "path": bundle_dir}
        if free >= needed:
            result["prepared"] = prepare({"root": p["root"], "dir": incoming, "names": p["names"]})
    return result


def finish(p):
    """The last step: ``verify`` the upload (when ``verify`` is given), then ``promote`` it."""
    if p.get("verify"):
        check = verify(dict(p["verify"], root=p.get("root")))
        if not check["ok"]:
            return dict(check, stage="verify")
        p["record"]["manifest_sha256"] = check["manifest_sha256"]
    return promote(p)


def discard(p):
    """Remove the upload directory of ``version`` (after the device ran out of space during
    it: a partial upload that filled the disk is worth less than the space). Reports the free
    space afterwards."""
    bundle_dir, version = _bundle_dir(p), _version(p.get("version"))
    incoming_root = os.path.join(bundle_dir, ".incoming")
    _remove_tree(os.path.join(incoming_root, version), incoming_root)
    return {"ok": True, "free_bytes": _free_bytes(bundle_dir), "path": bundle_dir}


def free(p):
    """The free space where the bundle ``name`` goes."""
    bundle_dir = _bundle_dir(p)
    return {"ok": True, "free_bytes": _free_bytes(bundle_dir), "path": bundle_dir}


OPERATIONS = {"plan": plan, "verify": verify, "prepare": prepare, "install_runtime": install_runtime, "finish": finish,
              "rollback": rollback, "discard": discard, "free": free}


def _serve(root):
    """The agent's main loop, the remote side of the master ssh connection: take the deploy
    lock, then answer one JSON request per line ({"op", "payload"}) with one result line, until
    stdin closes (the deploy ended, or edgekit died): then the lock goes with this process."""
    global SERVED_ROOT
    root = os.path.abspath(os.path.expanduser(root))
    SERVED_ROOT = root
    os.makedirs(root, exist_ok=True)
    lock = open(os.path.join(root, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("edgekit-busy", flush=True)
        return 3
    replies = sys.stdout
    sys.stdout = sys.stderr  # whatever an operation prints cannot corrupt the replies
    replies.write("edgekit-ready " + root + "\n")
    replies.flush()
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        request = json.loads(line)
        op = request.get("op")
        try:
            if op not in OPERATIONS or not isinstance(request.get("payload"), dict):
                raise Refused(f"unknown operation {op!r}")
            result = OPERATIONS[op](request["payload"])
        except Refused as exc:
            result = {"ok": False, "refused": True, "error": f"{op} refused on the device: {exc}"}
        except OSError as exc:
            result = {"ok": False, "error": f"{op} failed on the device: {type(exc).__name__}: {exc}"}
            if exc.errno == errno.ENOSPC:
                result.update(no_space=True, free_bytes=_free_bytes(root), path=root)
        except Exception as exc:  # reported to the controller as this host's failure, with the reason
            result = {"ok": False, "error": f"{op} failed on the device: {type(exc).__name__}: {exc}"}
        replies.write(MARK + json.dumps(result) + "\n")
        replies.flush()
