"""Ed25519 signatures over bundles, and which keys a device trusts.

The publisher signs a finished bundle (``edgekit sign BUNDLE --key FILE``); a device
configured with one or more public keys (:func:`trusted_keys`) refuses to load, build or
serve a bundle that is unsigned, modified since signing, or signed by a key it does not
trust (:func:`require_trusted`, called by the runtime's branches and the engine commands).

What is signed (``signature.json``, format ``edgekit.signature/1``): the canonical JSON
(sorted keys, no whitespace) of a *payload* that holds

* ``files``: every file of the bundle with its sha256 and size, except ``manifest.json``,
  ``signature.json`` and :data:`DEVICE_BUILT_PATHS`, hashed from disk at signing time (and
  checked against the manifest's own table: a bundle whose manifest disagrees with its files
  is not signed);
* ``manifest``: the manifest's *signed view*: manifest.json without its ``engines`` record
  and with its ``files`` table reduced to the signed files, plus ``manifest_sha256`` of it;
* ``key_id``, ``signed_at`` and the ``device_built`` path list the signature leaves open.

``signature.json`` carries that payload text verbatim, its sha256, the key id and the
base64 signature, so anyone can check it with any Ed25519 implementation.

Verification (:func:`verify_bundle`): the signature is valid under a trusted key; the
current manifest.json reduced the same way equals the signed view; no file outside the
signed table exists except under :data:`DEVICE_BUILT_PATHS`; every signed file exists with
its size and sha256 (streamed). The first failure raises :class:`SignatureError` naming the
file. Device-built engines are integrity-recorded (the manifest's ``files``/``engines``,
and each engine's sha256 in ``engine/<target>.engine.json``, checked before it is loaded)
but not publisher-signed.

``cryptography`` is imported only where a key is used: a device without trusted keys pays
nothing for this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from edgekit.bundle.manifest import MANIFEST_NAME as _MANIFEST, SIGNATURE_NAME  # noqa: F401 (the format's names)
from edgekit.errors import EdgekitError, OutputError, SignatureError

SIGNATURE_FORMAT = "edgekit.signature/1"
ALGORITHM = "ed25519"
TRUSTED_KEYS_ENV = "EDGEKIT_TRUSTED_KEYS"
SYSTEM_TRUSTED_KEYS_DIR = Path("/etc/edgekit/trusted_keys")

# What `edgekit build-engine` writes into a bundle on the device (edgekit.engine.prepare,
# builder, the trtexec scripts and ort_providers.ort_cache_dir): engine/<target>.plan and its
# .engine.json/.layers.json/.build.log, .settings.json/.trtexec.sh/.check.json regenerated
# with the device's build options, engine/ort-<target>/ (ONNX Runtime's TensorRT EP engine
# and timing caches, also rewritten by ONNX Runtime at session time), and the top-level
# build_engine.sh. None of it can carry the publisher's signature: an engine is built per
# device, for its GPU and TensorRT version, after the bundle was signed, and build-engine
# rewrites the rest with options chosen there. So a signature never covers these paths (even
# when they exist at signing time), and files there are allowed beside a signed bundle.
# (The timing cache goes beside the bundle directory, not into it.)
DEVICE_BUILT_PATHS = ("engine/", "build_engine.sh")

_log = logging.getLogger("edgekit.signing")
_reported_unsigned: set[tuple[str, tuple[str, ...]]] = set()
_HOW_CONFIGURE = (f"put the publisher's public key (.pub) into ~/.config/edgekit/trusted_keys/ or {SYSTEM_TRUSTED_KEYS_DIR}/, "
                  f"or name key files/directories in {TRUSTED_KEYS_ENV}")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: its 32 raw bytes, its id and where it was read from."""

    raw: bytes
    source: str

    @property
    def key_id(self) -> str:
        return key_id(self.raw)


def key_id(raw_public_key: bytes) -> str:
    """The first 16 hex digits of the sha256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write_private(path: Path, data: bytes) -> None:
    """Temp file (mkstemp: mode 0600 from the start, never readable by others) + rename."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_keypair(private_path: str | Path, public_path: str | Path | None = None, *, force: bool = False) -> dict[str, str]:
    """A new Ed25519 key pair: the private key as unencrypted PKCS#8 PEM (mode 0600, written
    atomically), the public key as one OpenSSH line (``ssh-ed25519 AAAA... edgekit:<key id>``)
    at ``public_path`` (default: the private path + ``.pub``). Refuses to overwrite either
    file unless ``force``. Returns ``{"key_id", "private", "public"}``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgekit.yamlio import atomic_write_text

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(private_path.name + ".pub")
    if private_path.resolve() == public_path.resolve():
        raise OutputError("the public key would overwrite the private key", where=str(public_path),
                          how="give the public key another name")
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise OutputError(f"{path.name} already exists", where=str(path),
                              how="pass --force to replace it (bundles signed with the old key then verify only with the old "
                              "public key), or choose another --out")
        if path.is_dir():
            raise OutputError("a directory is in the way of the key file", where=str(path), how="choose another --out")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    raw = _raw_public(private.public_key())
    ident = key_id(raw)
    openssh = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    _write_private(private_path, pem)
    atomic_write_text(public_path, f"{openssh} edgekit:{ident}\n")
    return {"key_id": ident, "private": str(private_path), "public": str(public_path)}


def load_private_key(path: str | Path) -> tuple[Any, str]:
    """(Ed25519PrivateKey, key id) from a PKCS#8 PEM file (``edgekit keygen``) or an OpenSSH
    private key (``ssh-keygen -t ed25519 -N ''``)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise EdgekitError("signing key not found", where=str(path),
                           how="pass the private key written by `edgekit keygen --out FILE`")
    data = path.read_bytes()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EdgekitError("the signing key is encrypted", where=str(path),
                           how="use an unencrypted key kept secret by file mode 0600 or a CI secret (edgekit keygen writes one)",
                           ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        if b"ssh-ed25519 " in data[:12] or b"BEGIN PUBLIC KEY" in data:
            how = "pass the private key, not the .pub file"
        else:
            how = "pass the private key written by `edgekit keygen --out FILE`"
        raise EdgekitError(f"not a private key file ({type(exc).__name__})", where=str(path), how=how) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgekitError(f"the signing key is {type(key).__name__.removeprefix('_')}, not Ed25519", where=str(path),
                           how="create an Ed25519 key with `edgekit keygen --out FILE`")
    return key, key_id(_raw_public(key.public_key()))


def _parse_public(line: str, where: str) -> bytes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    parts = line.split()
    if parts[0] == "ssh-ed25519" and len(parts) >= 2:
        try:
            key = serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise EdgekitError(f"malformed ssh-ed25519 public key ({exc})", where=where,
                               how="copy the .pub line written by `edgekit keygen` unchanged") from None
        return _raw_public(key)
    if parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise EdgekitError(f"{parts[0]} key: only Ed25519 (ssh-ed25519) keys sign bundles", where=where,
                           how="use the .pub of an `edgekit keygen` (or ssh-keygen -t ed25519) key")
    try:
        raw = base64.b64decode(parts[0], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise EdgekitError("not an Ed25519 public key (expected 'ssh-ed25519 AAAA...', a PEM public key or 32 bytes in base64)",
                           where=where, how="use the .pub file written by `edgekit keygen`")
    Ed25519PublicKey.from_public_bytes(raw)  # any 32 bytes load; the check is that the library accepts the encoding
    return raw


def load_public_keys(path: str | Path) -> list[PublicKey]:
    """Public keys from a file (one OpenSSH ``ssh-ed25519`` line or raw base64 key per line,
    ``#`` comments allowed, or a PEM public key) or from every ``*.pub`` in a directory."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.pub"))
        if not files:
            raise EdgekitError("no public keys (*.pub) in this directory", where=str(path),
                               how="copy the publisher's .pub file there, or name the key file itself")
        return [key for file in files for key in load_public_keys(file)]
    if not path.is_file():
        raise EdgekitError("public key file not found", where=str(path),
                           how="check the path (a .pub file or a directory of them)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgekitError(f"cannot read the public key file ({exc})", where=str(path), how="pass a .pub text file") from None
    if "PRIVATE KEY" in text:
        raise EdgekitError("this is a private key", where=str(path),
                           how="give devices and `edgekit verify` the public key (the .pub file beside it) only")
    if "BEGIN PUBLIC KEY" in text:
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise EdgekitError(f"malformed PEM public key ({exc})", where=str(path),
                               how="use the .pub file written by `edgekit keygen`") from None
        if not isinstance(key, Ed25519PublicKey):
            raise EdgekitError(f"the public key is {type(key).__name__.removeprefix('_')}, not Ed25519", where=str(path),
                               how="use an Ed25519 key (edgekit keygen)")
        return [PublicKey(_raw_public(key), str(path))]
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(PublicKey(_parse_public(line, f"{path} line {number}"), str(path)))
    if not keys:
        raise EdgekitError("the public key file holds no key", where=str(path),
                           how="use the .pub file written by `edgekit keygen`")
    return keys


def _user_keys_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edgekit" / "trusted_keys"


def trusted_keys() -> list[PublicKey]:
    """The public keys this machine trusts; empty = signatures are not required here.

    The first source that is configured wins: ``$EDGEKIT_TRUSTED_KEYS`` (key files and/or
    directories of ``*.pub``, separated by ``os.pathsep``; every entry must exist and hold a
    key: a misconfiguration fails closed), else ``~/.config/edgekit/trusted_keys/*.pub``
    (``$XDG_CONFIG_HOME`` respected), else ``/etc/edgekit/trusted_keys/*.pub``. Several keys
    = key rotation: a bundle signed by any of them verifies."""
    configured = os.environ.get(TRUSTED_KEYS_ENV, "")
    entries = [entry for entry in configured.split(os.pathsep) if entry.strip()]
    if entries:
        keys = []
        for entry in entries:
            if not Path(entry).expanduser().exists():
                raise EdgekitError(f"{TRUSTED_KEYS_ENV} names a path that does not exist", where=entry,
                                   how=f"fix {TRUSTED_KEYS_ENV} (public key files or directories of *.pub, "
                                   f"separated by '{os.pathsep}')")
            keys += load_public_keys(entry)
        return keys
    for directory in (_user_keys_dir(), SYSTEM_TRUSTED_KEYS_DIR):
        if directory.is_dir() and any(directory.glob("*.pub")):
            return load_public_keys(directory)
    return []


# --------------------------------------------------------------------------- the bundle's files


def is_device_built(rel: str, device_built: Iterable[str] = DEVICE_BUILT_PATHS) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in device_built)


def _signable(rel: str) -> bool:
    return rel not in (_MANIFEST, SIGNATURE_NAME) and not is_device_built(rel)


def _manifest_view(manifest: dict[str, Any], signed: Iterable[str]) -> dict[str, Any]:
    """The part of manifest.json a signature covers: no ``engines`` record (build-engine adds
    it on the device) and only the signed files' rows (build-engine adds rows for engine/)."""
    signed = set(signed)
    view = {k: v for k, v in manifest.items() if k != "engines"}
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    view["files"] = {rel: meta for rel, meta in files.items() if rel in signed}
    return view


def _canonical(data: Any) -> str:
    # NaN/Infinity in stage metrics stay as JSON's NaN literal: both sides compare as text.
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _read_manifest(bundle_dir: Any, error: type[EdgekitError] = EdgekitError) -> dict[str, Any]:
    """The manifest as a JSON object (edgekit.bundle.manifest.read_manifest: "not a bundle" as
    EdgekitError, anything unusable as ``error``); a :class:`Bundle` handle's own, not read again."""
    from edgekit.bundle.manifest import Bundle, read_manifest

    if isinstance(bundle_dir, Bundle):
        return bundle_dir.manifest.raw
    if not (Path(bundle_dir) / _MANIFEST).is_file():
        return read_manifest(bundle_dir).raw  # raises "not a bundle (no manifest.json)"
    return read_manifest(bundle_dir, error_cls=error).raw


def _size_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- sign


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path) -> dict[str, Any]:
    """Write ``signature.json`` into the bundle (atomically). Refuses a bundle whose files
    disagree with its manifest's sha256 table. When the bundle's reproducible tar
    (``<name>.tar`` beside the directory, as the bundle stage writes it) exists, it is
    rewritten (temp file + rename) so that it carries the signature too.

    Returns ``{"bundle", "key_id", "files", "bytes", "signature", "tar", "unsigned"}``;
    ``unsigned`` lists the device-built files present, which the signature does not cover."""
    from edgekit.bundle.archive import bundle_listing, check_file_table
    from edgekit.hashing import sha256_file
    from edgekit.yamlio import atomic_write, atomic_write_json

    manifest = _read_manifest(bundle_dir)
    bundle_dir = Path(bundle_dir)
    private, ident = load_private_key(private_key_path)
    listing = bundle_listing(bundle_dir)
    recorded = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    if recorded:
        check_file_table(recorded, where=str(bundle_dir / _MANIFEST))
    table: dict[str, dict[str, Any]] = {}
    for rel in listing:
        if not _signable(rel):
            continue
        path = bundle_dir / rel
        table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        if rel not in recorded:
            raise EdgekitError(f"{rel} is not in the manifest's file table, so the bundle is not what its manifest describes",
                               where=str(path), how="remove the file, or rebuild the bundle (edgekit compress) and sign that")
        if recorded[rel] != table[rel]:
            raise EdgekitError(f"{rel} does not match its sha256 in manifest.json", where=str(path),
                               how="restore the file, or rebuild the bundle (edgekit compress) and sign that")
    missing = sorted(rel for rel in recorded if _signable(rel) and rel not in table)
    if missing:
        raise EdgekitError(f"manifest.json lists {missing[0]}, which is missing", where=str(bundle_dir / missing[0]),
                           how="restore the file, or rebuild the bundle (edgekit compress) and sign that")
    view = _manifest_view(manifest, table)
    signed_at = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    payload = {
        "bundle": manifest.get("name", bundle_dir.name),
        "files": table,
        "manifest": view,
        "manifest_sha256": hashlib.sha256(_canonical(view).encode()).hexdigest(),
        "device_built": list(DEVICE_BUILT_PATHS),
        "key_id": ident,
        "signed_at": signed_at,
    }
    text = _canonical(payload)
    signature = private.sign(text.encode())
    record = {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": ident,
        "signed_at": signed_at,
        "payload_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "signature": base64.b64encode(signature).decode(),
        "payload": text,
    }
    atomic_write_json(bundle_dir / SIGNATURE_NAME, record)
    named = bundle_dir if bundle_dir.name not in ("", ".", "..") else bundle_dir.resolve()  # `edgekit sign .`: ../<name>.tar
    tar_path = named.parent / f"{named.name}.tar"
    if tar_path.is_file():
        from edgekit.bundle.manifest import write_tar

        atomic_write(tar_path, lambda tmp: write_tar(named, tmp))
    return {
        "bundle": str(bundle_dir),
        "key_id": ident,
        "files": len(table),
        "bytes": sum(meta["size"] for meta in table.values()),
        "signature": str(bundle_dir / SIGNATURE_NAME),
        "tar": str(tar_path) if tar_path.is_file() else None,
        "unsigned": [rel for rel in listing if is_device_built(rel)],
    }


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """A bundle that verified: who signed it and what the signature covers."""

    bundle: str
    key_id: str
    key_source: str
    signed_at: str
    files: int
    bytes: int
    device_files: list[str] = field(default_factory=list)  # present, allowed, not covered: unsigned

    @property
    def unsigned(self) -> list[str]:
        """The files present that the signature does not cover (device-built), by name."""
        return list(self.device_files)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


_HOW_RESTORE = ("restore the bundle from its signed source (deploy or unpack the signed bundle again); "
                "if the change is intended, re-sign the bundle where it is published (edgekit sign)")


def _read_signature(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        raise SignatureError("signature.json is not valid JSON", where=str(path), how=_HOW_RESTORE) from None
    if not isinstance(record, dict):
        raise SignatureError("signature.json is not a JSON object", where=str(path), how=_HOW_RESTORE)
    if record.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"signature.json has format {record.get('format')!r}, this edgekit reads {SIGNATURE_FORMAT}",
                             where=str(path), how="sign the bundle again with this edgekit version, or upgrade edgekit here")
    if record.get("algorithm") != ALGORITHM:
        raise SignatureError(f"signature.json uses algorithm {record.get('algorithm')!r}, not {ALGORITHM}", where=str(path),
                             how=_HOW_RESTORE)
    for key in ("key_id", "signature", "payload"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise SignatureError(f"signature.json lacks '{key}'", where=str(path), how=_HOW_RESTORE)
    return record


def _safe_rel(rel: Any) -> bool:
    from edgekit.bundle.archive import bundle_path_problem

    return bundle_path_problem(rel) is None


def _changed_keys(current: dict[str, Any], signed: dict[str, Any]) -> list[str]:
    keys = sorted(set(current) | set(signed))
    return [k for k in keys if _canonical(current.get(k)) != _canonical(signed.get(k))]


def verify_bundle(bundle_dir: Any, public_keys: Iterable[PublicKey | str | Path]) -> VerifyReport:
    """Check the bundle's signature under ``public_keys`` (PublicKey objects or key file /
    directory paths) and every file it covers. Raises :class:`SignatureError` naming the
    first failure (unsigned, untrusted key, altered signature, manifest edited, a file
    modified / missing / extra); :class:`EdgekitError` for bad input (no bundle, no key)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgekit.bundle.archive import bundle_listing
    from edgekit.hashing import sha256_file

    handle, bundle_dir = bundle_dir, Path(bundle_dir)
    keys: dict[str, PublicKey] = {}
    for item in public_keys:
        for key in [item] if isinstance(item, PublicKey) else load_public_keys(item):
            keys.setdefault(key.key_id, key)
    manifest = _read_manifest(handle, SignatureError)
    if not keys:
        raise EdgekitError("no public key to verify the bundle against", where=str(bundle_dir),
                           how=f"pass --key PUBFILE, or {_HOW_CONFIGURE}")
    sig_path = bundle_dir / SIGNATURE_NAME
    if not sig_path.is_file():
        raise SignatureError("unsigned bundle (no signature.json)", where=str(bundle_dir),
                             how="sign it where it is published (edgekit sign BUNDLE --key FILE) and ship it with signature.json")
    record = _read_signature(sig_path)
    ident = record["key_id"]
    key = keys.get(ident)
    if key is None:
        raise SignatureError(f"signed by an untrusted key {ident}", where=str(sig_path),
                             how=f"if you trust that publisher, add its public key to the trusted keys; this machine trusts "
                             f"{', '.join(sorted(keys))}")
    text = record["payload"]
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        Ed25519PublicKey.from_public_bytes(key.raw).verify(signature, text.encode())
    except (InvalidSignature, ValueError):
        raise SignatureError(f"signature.json does not verify under key {ident}: the signature or its payload was altered",
                             where=str(sig_path), how=_HOW_RESTORE) from None
    # From here on the payload is the publisher's own words.
    payload = json.loads(text)
    files = payload.get("files")
    if (payload.get("key_id") != ident or not isinstance(files, dict) or not isinstance(payload.get("manifest"), dict)
            or not all(_safe_rel(rel) and isinstance(meta, dict) for rel, meta in files.items())):
        raise SignatureError("signature.json's payload is malformed", where=str(sig_path), how=_HOW_RESTORE)
    device_built = payload.get("device_built", list(DEVICE_BUILT_PATHS))
    if not isinstance(device_built, list) or not all(isinstance(p, str) and p for p in device_built):
        raise SignatureError("signature.json's payload is malformed (device_built)", where=str(sig_path), how=_HOW_RESTORE)

    current = _manifest_view(manifest, files)
    if _canonical(current) != _canonical(payload["manifest"]):
        changed = _changed_keys(current, payload["manifest"])
        detail = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        raise SignatureError(f"manifest.json was modified since signing ({detail} changed)", where=str(bundle_dir / _MANIFEST),
                             how=_HOW_RESTORE)
    listing = bundle_listing(bundle_dir)
    device_files = []
    for rel in listing:
        if rel in (_MANIFEST, SIGNATURE_NAME) or rel in files:
            continue
        if is_device_built(rel, device_built):
            device_files.append(rel)
            continue
        raise SignatureError(f"extra file {rel} not covered by the signature", where=str(bundle_dir / rel),
                             how="remove it; files a signed bundle needs are added where it is published, "
                             "and the bundle is signed again")
    present = set(listing)
    for rel, meta in files.items():  # sizes first: a truncated weight file fails before anything is hashed
        path = bundle_dir / rel
        if rel not in present:
            raise SignatureError(f"{rel} is missing (it was signed)", where=str(path), how=_HOW_RESTORE)
        if path.stat().st_size != meta.get("size"):
            raise SignatureError(f"{rel} was modified since signing: {path.stat().st_size} bytes, signed {meta.get('size')}",
                                 where=str(path), how=_HOW_RESTORE)
    for rel, meta in files.items():
        if sha256_file(bundle_dir / rel) != meta.get("sha256"):
            raise SignatureError(f"{rel} was modified since signing", where=str(bundle_dir / rel), how=_HOW_RESTORE)
    return VerifyReport(bundle=str(bundle_dir), key_id=ident, key_source=key.source, signed_at=str(payload.get("signed_at")),
                        files=len(files), bytes=sum(int(meta.get("size", 0)) for meta in files.values()),
                        device_files=device_files)


def unsigned_note(report: VerifyReport) -> str | None:
    """One line naming the files of a verified bundle that its signature does not cover, or
    None when it covers every file."""
    if not report.device_files:
        return None
    return (f"{len(report.device_files)} unsigned file(s) in {report.bundle}, device-built and not covered by the "
            f"signature of {report.key_id}: {', '.join(report.device_files)}")


def require_trusted(bundle_dir: Any, *, report_unsigned: bool = True) -> VerifyReport | None:
    """The device policy: when this machine trusts any key (:func:`trusted_keys`), the bundle
    must verify under one of them (raises :class:`SignatureError` naming what failed);
    with no key configured it is a no-op and returns None. A directory without manifest.json
    is left to the caller's own "not a bundle" error.

    Files present that the signature does not cover (:data:`DEVICE_BUILT_PATHS`) are named in
    a warning on the ``edgekit.signing`` logger (stderr when logging is not configured), once
    per bundle and file set in a process, unless ``report_unsigned`` is False (the caller
    reports them itself: ``edgekit unpack``, ``edgekit verify``). ``bundle_dir`` may be a
    :class:`~edgekit.bundle.manifest.Bundle` handle (its manifest is not read again)."""
    handle, bundle_dir = bundle_dir, Path(bundle_dir)
    keys = trusted_keys()
    if not keys or not (bundle_dir / _MANIFEST).is_file():
        return None
    try:
        report = verify_bundle(handle, keys)
        note = unsigned_note(report)
        key = (str(bundle_dir.resolve()), tuple(report.device_files))
        if report_unsigned and note and key not in _reported_unsigned:
            _reported_unsigned.add(key)
            _log.warning("warning: %s", note)
        return report
    except SignatureError as exc:
        # say why this machine cares: it is configured to load only signed bundles
        how = (exc.how or "").rstrip(".")
        raise SignatureError(exc.what, where=exc.where,
                             how=f"{how}; this machine loads only bundles signed by a key in {_trust_source(keys)}") from None


def _trust_source(keys: list[PublicKey]) -> str:
    if os.environ.get(TRUSTED_KEYS_ENV, "").strip():
        return f"${TRUSTED_KEYS_ENV}"
    return str(Path(keys[0].source).parent)


def refuse_if_signed(bundle_dir: str | Path, change: str) -> None:
    """For commands that modify a bundle's signed files (calibrate-router rewrites runtime.json):
    refuse a signed bundle instead of silently invalidating its signature."""
    path = Path(bundle_dir) / SIGNATURE_NAME
    if path.is_file():
        raise SignatureError(f"the bundle is signed and {change}, which would invalidate the signature", where=str(path),
                             how="do this before signing: on the publisher's copy delete signature.json, run it, then sign again "
                             "(edgekit sign BUNDLE --key FILE)")
