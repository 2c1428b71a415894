"""Deploy one bundle to one device (the steps; :mod:`edgekit.deploy.fleet` runs them per host).

1. connect (host key checked, the device's deploy lock taken) and *plan* in one round trip:
   what the device has; the bundle's version, if already there, verified (sha256 of every
   file); else its upload directory prepared;
2. install the edgekit runtime (an sdist, compiled there) when that version of it is missing;
3. upload with rsync into ``.incoming/<version>/`` (``--partial-dir``: an interrupted upload
   resumes; ``--copy-dest`` the current version: unchanged files are copied on the device, not
   sent again);
4. optionally ``build-engine`` inside ``.incoming/<version>`` (still mutable), after verifying it;
5. *finish* in one round trip: verify the upload against the manifest, rename it into place,
   record it and switch ``current`` atomically. Anything failing before this leaves ``current``
   as it was. A version already there that failed verification is uploaded again and the bad
   copy quarantined;
6. optionally ``validate`` the deployed bundle there and fetch the reports.

``<version>`` is the first 12 hex digits of sha256(manifest.json [+ signature.json]), with
``-engine`` appended for a deploy that builds the engine on the device (that directory is the
bundle plus what build-engine wrote into it).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit import __version__
from edgekit.deploy.hosts import HostSpec
from edgekit.deploy.ssh import Connection, SshOptions, classify_failure, terminate
from edgekit.errors import DeployError
from edgekit.bundle.archive import check_bundle_path
from edgekit.names import check_name

MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
PARTIAL_DIR = ".rsync-partial"
# Modules the runtime imports on the device -> the pip package that provides them.
RUNTIME_MODULES = {"numpy": "numpy", "onnxruntime": "onnxruntime", "tokenizers": "tokenizers", "jinja2": "jinja2",
                   "pydantic": "pydantic", "yaml": "pyyaml", "click": "click", "rich": "rich"}
ENGINE_MODULES = {"onnx": "onnx"}
# pyproject.toml's `license = "Apache-2.0"` (PEP 639) needs setuptools 77 to build the runtime.
SETUPTOOLS_MIN = (77, 0)
_VERSION = re.compile(r"[0-9a-f]{12}(-engine)?")
# Tests only: the free space the device's agent reports instead of measuring it (statvfs), to
# exercise the out-of-space refusal where no small filesystem can be mounted. Not for use.
TEST_FREE_BYTES_ENV = "EDGEKIT_DEPLOY_TEST_FREE_BYTES"
_ENOSPC = ("No space left on device", "Errno 28", "ENOSPC", "Disk quota exceeded")
_RSYNC_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+\d+%")


@dataclass(frozen=True)
class LocalBundle:
    path: Path
    name: str
    manifest_sha256: str
    signature_sha256: str | None
    files: dict[str, Any]
    bytes: int
    content_version: str  # 12 hex of sha256(manifest.json [+ signature.json])

    def version(self, *, build_engine: bool) -> str:
        return self.content_version + ("-engine" if build_engine else "")

    @property
    def upload_names(self) -> list[str]:
        return sorted(set(self.files) | {MANIFEST} | ({SIGNATURE} if self.signature_sha256 else set()))


def load_bundle(path: str | Path) -> LocalBundle:
    """A local bundle directory, after checking every file against its manifest (a damaged
    bundle is refused here, before anything is sent)."""
    from edgekit.bundle.archive import verify_manifest_files
    from edgekit.bundle.manifest import Bundle
    from edgekit.hashing import sha256_file

    path = Path(path).expanduser()
    if path.is_file() and path.name.endswith((".tar", ".tar.gz")):
        raise DeployError("a bundle archive, not a bundle directory", where=str(path),
                          how=f"unpack it first (edgekit unpack {path.name}, or tar -xf) and pass the directory")
    bundle = Bundle.open(path, error_cls=DeployError)
    manifest = bundle.manifest.raw
    name = bundle.checked_name(error_cls=DeployError)
    verify_manifest_files(bundle)  # every row a safe relative path, every file its size and sha256
    signature = path / SIGNATURE
    signed = signature.is_file()
    content = hashlib.sha256((path / MANIFEST).read_bytes() + (signature.read_bytes() if signed else b""))
    files = manifest["files"]
    return LocalBundle(path=path.resolve(), name=name, manifest_sha256=sha256_file(path / MANIFEST),
                       signature_sha256=sha256_file(signature) if signed else None, files=files,
                       bytes=sum(int(meta["size"]) for meta in files.values()), content_version=content.hexdigest()[:12])


@dataclass
class DeployOptions:
    remote_root: str = "~/edgekit"
    python: str = "python3"
    port: int | None = None
    identity: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10
    build_engine: bool = False
    validate: bool = False
    validate_args: tuple[str, ...] = ()
    reinstall_runtime: bool = False
    keep: int = 3
    reports_dir: Path = Path("deploy-reports")
    bwlimit: int | None = None  # KiB/s, rsync --bwlimit
    rsync_path: str | None = None  # the rsync program on the device

    @property
    def ssh(self) -> SshOptions:
        return SshOptions(known_hosts=os.path.expanduser(self.known_hosts) if self.known_hosts else None,
                          connect_timeout=self.connect_timeout)


@dataclass
class HostResult:
    """What happened on one device (``--json`` prints these)."""

    host: str
    status: str = "failed"  # deployed | up-to-date | rolled-back | failed
    bundle: str | None = None
    version: str | None = None
    previous: str | None = None  # what `current` pointed to before
    machine: str | None = None
    python: str | None = None
    bytes_sent: int = 0  # rsync's "Total bytes sent" for the bundle
    bytes_literal: int = 0  # file data sent as is
    bytes_matched: int = 0  # file data rebuilt on the device from what it had (a resumed partial file, the previous version)
    seconds: float = 0.0
    runtime: str | None = None  # installed | present | failed
    runtime_bytes_sent: int = 0
    fastpath: bool | None = None
    engine: str | None = None
    validate: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Events:
    """Progress callbacks (no-ops here; the fleet shows them with rich)."""

    def status(self, host: str, text: str) -> None: ...

    def progress(self, host: str, done: int, total: int) -> None: ...


class RuntimeSource:
    """The runtime sdist: its key is known without building; built once, on first need."""

    def __init__(self, *, prebuilt: str | None, cache_dir: Path):
        from edgekit.deploy import runtime_dist

        self._cache_dir = cache_dir
        self._dist = runtime_dist.prebuilt(prebuilt) if prebuilt else None
        self.key = self._dist.key if self._dist else runtime_dist.runtime_key(runtime_dist.require_checkout())
        check_name(self.key, what="runtime key", where=prebuilt or "this checkout", error_cls=DeployError)

    def sdist(self):
        from edgekit.deploy import runtime_dist

        if self._dist is None:
            self._dist = runtime_dist.build_sdist(self._cache_dir)
        return self._dist


# --- one host ------------------------------------------------------------------------------


class OutOfSpace(DeployError):
    """The device's disk is full (or would be): says how much is free and how much is needed."""


def out_of_space(label: str, path: str, free: int | None, needed: int, *, during: str | None = None) -> OutOfSpace:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    when = f" (No space left on device during {during})" if during else ""
    have = f"{mib(free)} free" if free is not None else "its free space unknown"
    short = f" at least {mib(needed - free)} more" if free is not None and needed > free else ""
    return OutOfSpace(f"the device is out of space{when}: {have} on the filesystem of {path}, this deploy needs "
                      f"{mib(needed)}", where=label,
                      how=f"free{short or ' space'} there (old versions of other bundles, logs; --keep 2 keeps fewer versions "
                          "of this one), or pass --remote-root on a larger disk; then deploy again")


def _is_no_space(text: str | None) -> bool:
    return any(mark in (text or "") for mark in _ENOSPC)


def _require(result: dict[str, Any], host: HostSpec, *, how: str, needed: int | None = None,
             during: str | None = None) -> dict[str, Any]:
    if not result.get("ok"):
        if result.get("no_space"):
            raise out_of_space(host.label, result.get("path") or "?", result.get("free_bytes"), needed or 0,
                               during=during or "a step on the device")
        raise DeployError(result.get("error") or "failed", where=host.label, how=how)
    return result


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text or "")[:2]) or (0,)


def _rsync(conn: Connection, sources: Path, names: list[str], dest: str, options: DeployOptions, *, total: int,
           copy_dests: list[str] | None = None, on_progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """rsync ``names`` (relative to ``sources``) to ``dest`` on the device, resumably. Returns its stats."""
    for name in names:  # the list goes to rsync on its stdin: no temporary file to leave behind
        check_bundle_path(name, what="file name to upload", where=str(sources), error_cls=DeployError)
    argv = ["rsync", "--recursive", "--times", "--executability", "--checksum", "-s", "--partial",
            f"--partial-dir={PARTIAL_DIR}", "--timeout=120", "--stats", "--info=progress2", "--no-motd",
            "--files-from=-", "--from0", "-e", conn.rsync_shell()]
    if options.bwlimit:
        argv.append(f"--bwlimit={options.bwlimit}")
    if options.rsync_path:
        argv.append(f"--rsync-path={options.rsync_path}")
    argv += [f"--copy-dest={path}" for path in copy_dests or ()]
    argv += [f"{sources}/", f"{conn.host.rsync_destination}:{dest}/"]
    conn.check_open("the upload")
    stderr_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file,
                            env=dict(os.environ, LC_ALL="C"))
    output = b""
    try:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"".join(name.encode() + b"\0" for name in names))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # rsync ended at once: its exit status and stderr say why
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            output += chunk
            pending += chunk
            *pieces, pending = re.split(rb"[\r\n]", pending)
            for piece in pieces:
                match = _RSYNC_PROGRESS.match(piece)
                if match and on_progress:
                    on_progress(min(total, int(match.group(1).replace(b",", b""))))
        proc.wait()
        if proc.returncode == 0 and on_progress:
            on_progress(total)
    finally:
        terminate(proc)
    stderr_file.seek(0)
    stderr = stderr_file.read().decode(errors="replace")
    stderr_file.close()
    if proc.returncode != 0:
        conn.check_open("the end of the upload")
        if _is_no_space(stderr):
            raise _NoSpaceDuringUpload(stderr)
        if "ssh:" in stderr or "Host key" in stderr or "Permission denied" in stderr:
            raise classify_failure(stderr, conn.host, options.ssh, step="the upload")
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("rsync error:")]
        reason = lines[-1] if lines else f"exit {proc.returncode}"
        raise DeployError(f"rsync failed (exit {proc.returncode}): {reason}", where=conn.host.label,
                          how="run the deploy again: the upload resumes where it stopped")
    text = output.decode(errors="replace")

    def stat(label: str) -> int:
        match = re.search(rf"^{label}: ([\d,]+)", text, re.M)
        return int(match.group(1).replace(",", "")) if match else 0

    return {"sent": stat("Total bytes sent"), "literal": stat("Literal data"), "matched": stat("Matched data")}


class _NoSpaceDuringUpload(Exception):
    """rsync stopped because the device's disk is full (turned into :class:`OutOfSpace` by the caller)."""


def deploy_host(bundle: LocalBundle, host: HostSpec, options: DeployOptions, runtime: RuntimeSource,
                events: Events | None = None) -> HostResult:
    """Deploy ``bundle`` to one device. Never raises for the device's problems: they are the result's ``error``."""
    events = events or Events()
    version = bundle.version(build_engine=options.build_engine)
    result = HostResult(host=host.label, bundle=bundle.name, version=version)
    return _on_host(host, options, events, result, lambda conn: _deploy(conn, bundle, version, options, runtime, result, events))


def _on_host(host: HostSpec, options: DeployOptions, events: Events, result: HostResult,
             body: Callable[[Connection], None]) -> HostResult:
    """Connect, run ``body``, and turn what went wrong into the result's ``error`` (the other hosts go on)."""
    started = time.monotonic()
    try:
        events.status(host.label, "connecting")
        with Connection(host, options.ssh) as conn:
            body(conn)
    except DeployError as exc:
        result.status, result.error = "failed", exc.one_line()
    except Exception as exc:  # a bug: this host fails with the reason, the others go on
        result.status, result.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
    result.seconds = round(time.monotonic() - started, 2)
    events.status(host.label, result.status + (f": {result.error}" if result.error else ""))
    return result


def _deploy(conn: Connection, bundle: LocalBundle, version: str, options: DeployOptions, runtime: RuntimeSource,
            result: HostResult, events: Events) -> None:
    host, label = conn.host, conn.host.label
    root = conn.remote_root
    bundle_root = f"{root}/bundles/{bundle.name}"
    final_dir, incoming = f"{bundle_root}/{version}", f"{bundle_root}/.incoming/{version}"
    modules = {**RUNTIME_MODULES, **(ENGINE_MODULES if options.build_engine else {})}
    # 1. what the device has; the version, if there, verified (else its upload directory prepared)
    payload = {"root": root, "name": bundle.name, "version": version, "runtime_key": runtime.key, "modules": modules,
               "manifest_sha256": bundle.manifest_sha256, "signature_sha256": bundle.signature_sha256,
               "names": bundle.upload_names, "bytes": bundle.bytes}
    if os.environ.get(TEST_FREE_BYTES_ENV, "").isdigit():
        payload["assume_free_bytes"] = int(os.environ[TEST_FREE_BYTES_ENV])
    plan = _require(conn.call("plan", payload, timeout=_hash_timeout(bundle)), host, how="check the device",
                    needed=bundle.bytes, during="the plan")
    for link in ("current", "previous"):
        if plan.get(link) is not None and not (isinstance(plan[link], str) and _VERSION.fullmatch(plan[link])):
            raise DeployError(f"the device's {link} link names {plan[link]!r}, not a version", where=f"{label}:{bundle_root}",
                              how=f"point {bundle_root}/{link} at a version directory there (or remove it), then deploy again")
    result.machine, result.python, result.previous = plan["machine"], plan["python"], plan["current"]
    if not plan["python_ok"]:
        raise DeployError(f"Python {plan['python']} on the device; the edgekit runtime needs 3.10 or newer", where=label,
                          how="install a newer python3 there and pass --python PATH")
    if not plan["rsync"]:
        raise DeployError("rsync is not installed on the device", where=label, how="install it there (sudo apt install rsync)")
    if plan["missing_modules"]:
        pip = f"{host.python} -m pip install {' '.join(plan['missing_modules'])}"
        missing = f"the device's Python lacks {', '.join(plan['missing_modules'])}"
        if options.build_engine or options.validate:
            raise DeployError(f"{missing} (build-engine and validate run there)", where=label,
                              how=f"install them on the device ({pip}; on Jetson, onnxruntime-gpu from NVIDIA's Jetson index) "
                                  "and deploy again")
        result.warnings.append(f"{missing}: the runtime cannot run the bundle until they are installed ({pip})")
    existing = plan["existing"]
    present_ok, replace = bool(existing and existing["ok"]), bool(existing and not existing["ok"])
    if replace:
        result.warnings.append(f"version {version} on the device failed verification ({existing['error']}); "
                               "uploaded again, the bad copy quarantined in .quarantine/")
    space = plan.get("space")
    if not present_ok and space and not space["ok"]:
        # before anything is uploaded: the device's free space (statvfs, where the bundle goes) against what is left to send
        raise out_of_space(label, space["path"], space["free_bytes"], space["needed_bytes"])

    # 2. the runtime (before the upload: build-engine and validate need it, and a device that
    # cannot take it fails before anything big is sent)
    _runtime(conn, plan, options, runtime, result, events)

    record = None
    verify_upload = None
    if not present_ok:
        # 3. upload. Files the device already has are copied there instead of sent: from the
        # current version (an update changes a few files) and from a version that failed
        # verification (its good files; a damaged one is the delta basis, so only its damaged
        # blocks travel).
        events.status(label, f"uploading the bundle ({bundle.bytes / 1e6:.1f} MB)")
        copy_dests = [f"{bundle_root}/{plan['current']}"] if plan["current"] else []
        if replace and final_dir not in copy_dests:
            copy_dests.append(final_dir)
        try:
            stats = _rsync(conn, bundle.path, bundle.upload_names, incoming, options, total=bundle.bytes,
                           copy_dests=copy_dests, on_progress=lambda done: events.progress(label, done, bundle.bytes))
        except _NoSpaceDuringUpload:
            # The partial upload that filled the disk goes (a full disk hurts whatever else runs there).
            discarded = conn.call("discard", {"root": root, "name": bundle.name, "version": version}, timeout=600)
            needed = space["needed_bytes"] if space else bundle.bytes
            raise out_of_space(label, discarded.get("path") or bundle_root, discarded.get("free_bytes"), needed,
                               during="the upload") from None
        result.bytes_sent, result.bytes_literal, result.bytes_matched = stats["sent"], stats["literal"], stats["matched"]
        verify_upload = {"root": root, "dir": incoming, "manifest_sha256": bundle.manifest_sha256,
                         "signature_sha256": bundle.signature_sha256, "skip_partial": True}
        if options.build_engine:
            # 4. build-engine writes into the bundle and its manifest: only while it is still an upload,
            # and only from verified files.
            events.status(label, "verifying the upload on the device")
            _verified_upload(conn.call("verify", verify_upload, timeout=_hash_timeout(bundle)), label)
            events.status(label, "building the engine on the device")
            result.engine = _build_engine(conn, incoming, bundle.name, bundle.bytes)
            # now the device's rewritten manifest is the reference: every file must match it
            verify_upload = dict(verify_upload, manifest_sha256=None, signature_sha256="any" if bundle.signature_sha256 else None)
        now = time.time()
        record = {"version": version, "bundle": bundle.name, "manifest_sha256": bundle.manifest_sha256,
                  "signature_sha256": bundle.signature_sha256, "uploaded_manifest_sha256": bundle.manifest_sha256,
                  "uploaded_signature_sha256": bundle.signature_sha256, "engine_built": options.build_engine,
                  "deployed_unix": now, "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                  "deployed_by": f"edgekit {__version__}"}
    elif options.build_engine:
        result.engine = "built by an earlier deploy of this version"

    # 5. verify the upload, rename it into place, switch current (one round trip)
    if present_ok and plan["current"] == version:
        result.status = "up-to-date"
    else:
        events.status(label, "verifying on the device and switching current" if verify_upload else "switching current")
        finished = conn.call("finish", {"root": root, "name": bundle.name, "version": version, "uploaded": not present_ok,
                                           "replace": replace, "record": record, "keep": options.keep, "verify": verify_upload},
                          timeout=_hash_timeout(bundle) + 600)
        if finished.get("stage") == "verify":
            _verified_upload(finished, label)
        _require(finished, host, how="check the device; current was not switched", needed=2**20, during="the switch")
        result.status = "deployed"
        if finished.get("removed"):
            events.status(label, f"removed old versions {', '.join(finished['removed'])}")

    # 6. validate there, reports back here
    if options.validate:
        _validate(conn, bundle, version, final_dir, options, result, events)


def _verified_upload(check: dict[str, Any], label: str) -> None:
    if not check.get("ok"):
        raise DeployError(f"the uploaded copy failed verification on the device: {check.get('error')}", where=label,
                          how="deploy again (the upload is kept: the bad file is sent again); if it repeats, check the device's "
                              "storage (dmesg, df)")


def _free_on_device(conn: Connection, name: str) -> tuple[str, int | None]:
    answer = conn.call("free", {"root": conn.remote_root, "name": name}, timeout=120)
    return answer.get("path") or conn.remote_root, answer.get("free_bytes")


def _build_engine(conn: Connection, bundle_dir: str, name: str, bundle_bytes: int) -> str:
    proc = conn.run([f"{conn.remote_root}/bin/edgekit", "build-engine", bundle_dir], timeout=4 * 3600, step="build-engine")
    stdout, stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode != 0 and _is_no_space(stdout + stderr):
        # an engine takes about as much as the weights it was built from
        raise out_of_space(conn.host.label, *_free_on_device(conn, name), bundle_bytes, during="build-engine")
    if proc.returncode != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        errors = errors or (stdout + stderr).strip().splitlines()[-1:]
        raise DeployError(f"build-engine failed on the device: {errors[-1] if errors else f'exit {proc.returncode}'}",
                          where=conn.host.label, how="fix what it says, then deploy again (the upload is kept)")
    return next((line.strip() for line in stdout.splitlines() if line.strip()), "done")


def _hash_timeout(bundle: LocalBundle) -> float:
    return 120 + bundle.bytes / 10e6  # reading at 10 MB/s on the slowest eMMC


def _runtime(conn: Connection, probe: dict[str, Any], options: DeployOptions, runtime: RuntimeSource, result: HostResult,
             events: Events) -> None:
    host, label, root = conn.host, conn.host.label, conn.remote_root
    install = options.reinstall_runtime or not probe["runtime_installed"]
    if not install and probe["runtime_active"] == runtime.key and probe["runtime_fastpath"]:
        result.runtime, result.fastpath = "present", True
        return
    payload: dict[str, Any] = {"root": root, "key": runtime.key, "force": options.reinstall_runtime}
    if install:
        if not probe["pip"] or _version_tuple(probe["setuptools"]) < SETUPTOOLS_MIN:
            have = "no pip" if not probe["pip"] else f"setuptools {probe['setuptools'] or 'missing'}"
            raise DeployError(f"the device's Python cannot build the edgekit runtime ({have}; it needs pip and setuptools >= "
                              f"{'.'.join(map(str, SETUPTOOLS_MIN))})", where=label,
                              how=f"on the device: {host.python} -m pip install --user 'setuptools>=77' (python3-pip first if "
                                  "pip is missing), then deploy again")
        dist = runtime.sdist()
        events.status(label, f"installing the edgekit runtime {runtime.key} (compiling the C fast path on the device)")
        upload_dir = f"{root}/runtime/.incoming/{runtime.key}"
        prepared = conn.call("prepare", {"root": root, "dir": upload_dir, "names": [dist.path.name]}, timeout=120)
        _require(prepared, host, how="check the device", during="the runtime upload")
        try:
            stats = _rsync(conn, dist.path.parent, [dist.path.name], upload_dir, options, total=dist.path.stat().st_size)
        except _NoSpaceDuringUpload:
            raise out_of_space(label, root, None, dist.path.stat().st_size, during="the runtime upload") from None
        result.runtime_bytes_sent = stats["sent"]
        payload["sdist"] = f"{upload_dir}/{dist.path.name}"
    installed = conn.call("install_runtime", payload, timeout=1800)
    if installed.get("no_space"):
        _require(installed, host, how="", during="the runtime install")
    if not installed.get("ok"):
        result.runtime = "failed"
        raise DeployError(installed.get("error") or "runtime install failed", where=label,
                          how="fix the device's Python (pip, setuptools >= 77, a C compiler) and deploy again")
    result.runtime = "installed" if installed["installed"] else "present"
    result.fastpath = installed["fastpath"]
    if not installed["fastpath"]:
        missing = [what for what, ok in (("a C compiler (gcc)", installed.get("compiler")),
                                         ("the Python headers (python3-dev)", installed.get("python_headers"))) if not ok]
        cause = f"the device lacks {' and '.join(missing)}" if missing else installed.get("fastpath_error", "unknown")
        result.warnings.append(f"the C fast path was not built on the device ({cause}); the runtime uses the NumPy fallback, "
                               "several times slower per decode step. Install them (sudo apt install gcc python3-dev) and deploy "
                               "again with --reinstall-runtime")


def _validate(conn: Connection, bundle: LocalBundle, version: str, bundle_dir: str, options: DeployOptions, result: HostResult,
              events: Events) -> None:
    root, label = conn.remote_root, conn.host.label
    events.status(label, "validating on the device")
    out = f"{root}/reports/{bundle.name}/{version}/validate"
    proc = conn.run([f"{root}/bin/edgekit", "validate", bundle_dir, "--output", out, *options.validate_args], timeout=4 * 3600,
                    step="validate")
    verdict = {0: "passed", 1: "breached"}.get(proc.returncode, "error")
    lines = [line for line in (proc.stdout + proc.stderr).decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    local = Path(options.reports_dir) / re.sub(r"[^A-Za-z0-9._@-]", "_", label) / bundle.name / version / "validate"
    result.validate = {"verdict": verdict, "exit_code": proc.returncode, "detail": (errors or lines or [""])[-1],
                       "remote": out, "report": None}
    if verdict == "error":
        return
    local.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(conn, out, local, options)
        result.validate["report"] = str(local)
    except DeployError as exc:
        result.warnings.append(f"the validate report could not be fetched: {exc.one_line()}")


def _fetch(conn: Connection, remote_dir: str, local_dir: Path, options: DeployOptions) -> None:
    argv = ["rsync", "--recursive", "--times", "-s", "--timeout=120", "--no-motd", "-e", conn.rsync_shell()]
    if options.rsync_path:
        argv.append(f"--rsync-path={options.rsync_path}")
    argv += [f"{conn.host.rsync_destination}:{remote_dir}/", f"{local_dir}/"]
    conn.check_open("fetching the report")
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"), timeout=600)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise DeployError(f"rsync failed (exit {proc.returncode}): {lines[0] if lines else ''}", where=conn.host.label,
                          how="fetch it by hand with rsync")


def rollback_host(name: str, host: HostSpec, options: DeployOptions, events: Events | None = None) -> HostResult:
    """Point ``current`` back at ``previous`` on one device (verified first)."""
    check_name(name, what="bundle name", where="--rollback", error_cls=DeployError)
    result = HostResult(host=host.label, bundle=name)

    def body(conn: Connection) -> None:
        done = _require(conn.call("rollback", {"root": conn.remote_root, "name": name}, timeout=600), host,
                        how="deploy the version you want instead (edgekit deploy BUNDLE)")
        result.status, result.version, result.previous = "rolled-back", done["current"], done["previous"]

    return _on_host(host, options, events or Events(), result, body)
