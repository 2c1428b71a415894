"""Signed bundles and safe bundle archives, on a real tiny bundle (load -> export_onnx -> bundle).

Each test gets its own signed copy. Every refusal is checked for what it names (the file or
the tar member), and every refused archive for leaving nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import compress_tiny_bundle, run_cli

from edgekit import api
from edgekit.bundle import signing
from edgekit.bundle.archive import safe_extract, verify_manifest_files
from edgekit.bundle.signing import (
    SIGNATURE_NAME,
    generate_keypair,
    load_private_key,
    load_public_keys,
    require_trusted,
    sign_bundle,
    verify_bundle,
)
from edgekit.bundle.manifest import write_tar
from edgekit.cli import main
from edgekit.errors import EdgekitError, OutputError, SignatureError
from edgekit.hashing import file_table


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("signing"), tiny_model_dir)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("keys")
    return {name: generate_keypair(tmp / f"{name}.key") for name in ("publisher", "other")}


@pytest.fixture(autouse=True)
def no_configured_keys(tmp_path, monkeypatch):
    """Hermetic trust configuration: nothing from the environment, ~/.config or /etc."""
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(signing, "SYSTEM_TRUSTED_KEYS_DIR", tmp_path / "etc-trusted-keys")


@pytest.fixture
def bundle(source_bundle, keys, tmp_path) -> Path:
    """A signed copy of the tiny bundle, with its tar beside it (as the bundle stage leaves it)."""
    copy = tmp_path / "pub" / "tiny"
    shutil.copytree(source_bundle, copy)
    shutil.copyfile(source_bundle.parent / "tiny.tar", copy.parent / "tiny.tar")
    sign_bundle(copy, keys["publisher"]["private"])
    return copy


def _trust(monkeypatch, *pubs: str) -> None:
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, os.pathsep.join(pubs))


def _flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


# --- keys -------------------------------------------------------------------------------------


def test_keygen_writes_an_owner_only_private_key_and_refuses_to_overwrite(tmp_path):
    old_umask = os.umask(0)  # the private key must not depend on the caller's umask
    try:
        record = generate_keypair(tmp_path / "k" / "signing.key")
    finally:
        os.umask(old_umask)
    private, public = Path(record["private"]), Path(record["public"])
    assert public == tmp_path / "k" / "signing.key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    kind, blob, comment = public.read_text().split()
    # the key id is the sha256 of the raw 32-byte key (the last 32 bytes of the OpenSSH blob)
    raw = base64.b64decode(blob)[-32:]
    assert (kind, comment) == ("ssh-ed25519", f"edgekit:{record['key_id']}")
    assert record["key_id"] == hashlib.sha256(raw).hexdigest()[:16]
    # the same key as raw base64, and as a PEM public key, has the same id
    (tmp_path / "raw.pub").write_text("# rotated in 2026\n" + base64.b64encode(raw).decode() + "\n")
    assert [k.key_id for k in load_public_keys(tmp_path / "raw.pub")] == [record["key_id"]]
    from cryptography.hazmat.primitives import serialization

    pem = serialization.load_ssh_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pem.pub").write_bytes(pem)
    assert load_public_keys(tmp_path / "pem.pub")[0].key_id == record["key_id"]
    # an unencrypted OpenSSH private key (ssh-keygen -t ed25519 -N '') signs as well
    key, ident = load_private_key(private)
    (tmp_path / "id_ed25519").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    assert load_private_key(tmp_path / "id_ed25519")[1] == ident == record["key_id"]
    with pytest.raises(EdgekitError, match="pass the private key, not the .pub file"):
        load_private_key(public)

    before = private.read_bytes()
    with pytest.raises(OutputError, match="signing.key already exists"):
        generate_keypair(private)
    assert private.read_bytes() == before
    assert generate_keypair(private, force=True)["key_id"] != record["key_id"]
    with pytest.raises(EdgekitError, match="this is a private key"):
        load_public_keys(private)
    assert not [p for p in private.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_trusted_keys_configuration(tmp_path, keys, monkeypatch):
    assert signing.trusted_keys() == []
    assert require_trusted(tmp_path) is None  # nothing configured: no-op
    user_dir = tmp_path / "xdg" / "edgekit" / "trusted_keys"
    user_dir.mkdir(parents=True)
    assert signing.trusted_keys() == []  # an empty directory configures nothing
    shutil.copyfile(keys["publisher"]["public"], user_dir / "publisher.pub")
    assert [k.key_id for k in signing.trusted_keys()] == [keys["publisher"]["key_id"]]
    # the environment wins over ~/.config; several entries = several trusted keys (rotation)
    _trust(monkeypatch, keys["other"]["public"], str(user_dir))
    assert {k.key_id for k in signing.trusted_keys()} == {keys["other"]["key_id"], keys["publisher"]["key_id"]}
    # a configured path that is not there fails closed instead of silently trusting nothing
    _trust(monkeypatch, str(tmp_path / "missing.pub"))
    with pytest.raises(EdgekitError, match="EDGEKIT_TRUSTED_KEYS names a path that does not exist"):
        signing.trusted_keys()


# --- sign and verify --------------------------------------------------------------------------


def test_sign_then_verify(source_bundle, keys, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(source_bundle, copy)
    shutil.copyfile(source_bundle.parent / "tiny.tar", tmp_path / "tiny.tar")
    # a NaN metric (JSON's NaN literal) in the manifest must not make it unverifiable
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"][0]["metrics"]["perplexity"] = float("nan")
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    result = sign_bundle(copy, keys["publisher"]["private"])
    covered = {rel: meta for rel, meta in file_table(copy).items() if rel not in ("manifest.json", SIGNATURE_NAME)}
    assert result["files"] == len(covered) and result["bytes"] == sum(m["size"] for m in covered.values())
    assert result["key_id"] == keys["publisher"]["key_id"] and result["unsigned"] == []
    record = json.loads((copy / SIGNATURE_NAME).read_text())
    assert record["format"] == "edgekit.signature/1" and record["algorithm"] == "ed25519"
    assert record["payload_sha256"] == hashlib.sha256(record["payload"].encode()).hexdigest()
    payload = json.loads(record["payload"])
    assert payload["files"] == covered and "engines" not in payload["manifest"]

    report = verify_bundle(copy, [keys["publisher"]["public"]])
    assert (report.key_id, report.files, report.bytes) == (result["key_id"], len(covered), result["bytes"])
    assert report.device_files == []
    # the tar beside the bundle was rewritten with the signature inside, and still extracts to a verified bundle
    with tarfile.open(tmp_path / "tiny.tar") as tar:
        assert "tiny/signature.json" in tar.getnames()
    unpacked = safe_extract(tmp_path / "tiny.tar", tmp_path / "out")
    assert file_table(unpacked) == file_table(copy)
    assert verify_bundle(unpacked, [keys["publisher"]["public"]]).files == len(covered)


def test_a_modified_weight_byte_is_refused_naming_the_file(bundle, source_bundle, keys):
    pub = keys["publisher"]["public"]
    weights = bundle / "model.onnx_data"
    _flip_byte(weights)
    with pytest.raises(SignatureError, match=r"^model\.onnx_data was modified since signing \(.*model\.onnx_data\)"):
        verify_bundle(bundle, [pub])
    weights.write_bytes((source_bundle / "model.onnx_data").read_bytes()[:-8])
    with pytest.raises(SignatureError, match=r"model\.onnx_data was modified since signing: \d+ bytes, signed \d+"):
        verify_bundle(bundle, [pub])
    shutil.copyfile(source_bundle / "model.onnx_data", weights)
    assert verify_bundle(bundle, [pub]).files > 0  # restored: verifies again
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(SignatureError, match="tokenizer.json is missing"):
        verify_bundle(bundle, [pub])


def test_an_extra_file_is_refused_but_device_built_files_are_not(bundle, keys):
    pub = keys["publisher"]["public"]
    (bundle / "engine").mkdir()
    (bundle / "engine" / "jetson-orin-nano-8gb.plan").write_bytes(b"engine built on the device")
    (bundle / "engine" / "ort-jetson-orin-nano-8gb").mkdir()
    (bundle / "engine" / "ort-jetson-orin-nano-8gb" / "cache.engine").write_bytes(b"ort cache")
    (bundle / "build_engine.sh").write_text("#!/bin/sh\n")
    report = verify_bundle(bundle, [pub])
    assert report.device_files == [
        "build_engine.sh", "engine/jetson-orin-nano-8gb.plan", "engine/ort-jetson-orin-nano-8gb/cache.engine"]
    (bundle / "python").mkdir()
    (bundle / "python" / "sitecustomize.py").write_text("print('owned')\n")
    with pytest.raises(SignatureError, match=r"extra file python/sitecustomize\.py not covered by the signature"):
        verify_bundle(bundle, [pub])
    shutil.rmtree(bundle / "python")
    (bundle / "config2.json").symlink_to(bundle / "config.json")
    with pytest.raises(SignatureError, match="config2.json is a symbolic link"):
        verify_bundle(bundle, [pub])


def test_unsigned_bundle_refused_when_keys_are_configured_accepted_when_none(bundle, keys, monkeypatch):
    (bundle / SIGNATURE_NAME).unlink()
    with pytest.raises(SignatureError, match=r"^unsigned bundle \(no signature\.json\)"):
        verify_bundle(bundle, [keys["publisher"]["public"]])
    assert require_trusted(bundle) is None  # no trusted keys here: signatures are not required
    _trust(monkeypatch, keys["publisher"]["public"])
    with pytest.raises(SignatureError, match="unsigned bundle.*this machine loads only bundles signed by a key in"):
        require_trusted(bundle)


def test_untrusted_key_refused_and_rotation_accepts_either(bundle, keys, monkeypatch):
    with pytest.raises(SignatureError, match=f"signed by an untrusted key {keys['publisher']['key_id']}"):
        verify_bundle(bundle, [keys["other"]["public"]])
    _trust(monkeypatch, keys["other"]["public"], keys["publisher"]["public"])
    assert require_trusted(bundle).key_id == keys["publisher"]["key_id"]


def test_an_edited_manifest_or_signature_is_refused(bundle, keys):
    pub = keys["publisher"]["public"]
    manifest_path, sig_path = bundle / "manifest.json", bundle / SIGNATURE_NAME
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["budgets"]["latency_p99_ms"] = 10_000
    manifest_path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(SignatureError, match=r"manifest\.json was modified since signing \(budgets changed\)"):
        verify_bundle(bundle, [pub])
    manifest_path.write_text(original)
    # a forged payload (the weights' new sha256 written into it) no longer matches the signature
    record = json.loads(sig_path.read_text())
    payload = json.loads(record["payload"])
    payload["files"]["model.onnx"]["sha256"] = "0" * 64
    record["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    sig_path.write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="signature.json does not verify under key"):
        verify_bundle(bundle, [pub])


def test_signing_refuses_a_bundle_that_disagrees_with_its_manifest(source_bundle, keys, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(source_bundle, copy)
    (copy / "runtime.json").write_text('{"policy": "large_only"}\n')
    with pytest.raises(EdgekitError, match="runtime.json does not match its sha256 in manifest.json"):
        sign_bundle(copy, keys["publisher"]["private"])
    assert not (copy / SIGNATURE_NAME).exists()


def test_device_side_build_engine_keeps_the_publishers_signature(bundle, keys, monkeypatch):
    from edgekit.engine.options import BuildOptions

    _trust(monkeypatch, keys["publisher"]["public"])
    # the real build-engine as on a device without TensorRT: it verifies first, then writes the
    # engine settings/scripts and records them in the manifest's engines and files
    summary = api.build_engine(bundle, build="never", options=BuildOptions(max_prefill=64, workspace_gb=2))
    assert summary["status"] == "planned"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "jetson-orin-nano-8gb" in manifest["engines"] and "build_engine.sh" in manifest["files"]
    # the engine file the device's TensorRT would add, recorded like the builder records it
    plan = bundle / "engine" / "jetson-orin-nano-8gb.plan"
    plan.write_bytes(b"\x00serialized engine")
    digest = hashlib.sha256(plan.read_bytes()).hexdigest()
    manifest["files"]["engine/jetson-orin-nano-8gb.plan"] = {"sha256": digest, "size": plan.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    report = require_trusted(bundle)
    assert "engine/jetson-orin-nano-8gb.plan" in report.device_files and "build_engine.sh" in report.device_files
    # ... and the signed files are still checked after it
    _flip_byte(bundle / "model.onnx")
    with pytest.raises(SignatureError, match="model.onnx was modified since signing"):
        api.check_tensorrt(bundle, options=BuildOptions(max_prefill=64))


def test_the_runtime_refuses_a_tampered_bundle(bundle, keys, monkeypatch):
    from edgekit.runtime.backends import OnnxRuntimeBranch

    _trust(monkeypatch, keys["publisher"]["public"])
    assert OnnxRuntimeBranch(bundle, threads=1).vocab_size > 0  # signed and unmodified: loads
    tokenizer = json.loads((bundle / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<evil>"
    (bundle / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(SignatureError, match="tokenizer.json was modified since signing"):
        OnnxRuntimeBranch(bundle, threads=1)
    runtime_before = (bundle / "runtime.json").read_bytes()
    with pytest.raises(SignatureError, match="calibrate-router rewrites its runtime.json"):
        api.calibrate_router(bundle)  # refused for any signed bundle, before anything is loaded
    assert (bundle / "runtime.json").read_bytes() == runtime_before
    # the real command line: one line on stderr, exit 2, the file named
    result = run_cli("run", str(bundle), "--prompt", "hello", env={signing.TRUSTED_KEYS_ENV: keys["publisher"]["public"]})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer.json was modified since signing"), result.stderr


def test_cli_keygen_sign_verify_unpack(source_bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    shutil.copytree(source_bundle, tmp_path / "tiny")
    write_tar(tmp_path / "tiny", tmp_path / "tiny.tar")
    keygen = runner.invoke(main, ["keygen", "--out", "ci.key"])
    assert keygen.exit_code == 0, keygen.output
    ident = keygen.stdout.split()[2]  # "key id <id>"
    assert "public key:  ci.key.pub" in keygen.stdout
    assert runner.invoke(main, ["keygen", "--out", "ci.key"]).exit_code == 2
    signed = runner.invoke(main, ["sign", "tiny", "--key", "ci.key"])
    assert signed.exit_code == 0, signed.output
    assert f"with key {ident}" in signed.stdout and "rewrote tiny.tar" in signed.stdout
    verified = runner.invoke(main, ["verify", "tiny", "--key", "ci.key.pub"])
    assert verified.exit_code == 0 and verified.stdout.startswith("verified: ") and f"signed by {ident}" in verified.stdout
    # no key given and none configured: bad input (2), not a verdict
    assert runner.invoke(main, ["verify", "tiny"]).exit_code == 2
    assert runner.invoke(main, ["verify", "nowhere", "--key", "ci.key.pub"]).exit_code == 2
    # unpack the signed tar with the key configured: extracted, checked, signature verified
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(tmp_path / "ci.key.pub"))
    unpacked = runner.invoke(main, ["unpack", "tiny.tar", "device"])
    assert unpacked.exit_code == 0, unpacked.output
    assert f"signed by {ident}" in unpacked.stdout and (tmp_path / "device" / "tiny" / SIGNATURE_NAME).is_file()
    _flip_byte(tmp_path / "device" / "tiny" / "model.onnx_data")
    failed = runner.invoke(main, ["verify", "device/tiny"])
    assert failed.exit_code == 1 and failed.stderr.startswith("error: model.onnx_data was modified since signing"), failed.output
    again = runner.invoke(main, ["unpack", "tiny.tar", "device"])
    assert again.exit_code == 2 and "already exists" in again.stderr


# --- safe extraction --------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, str, object]]) -> Path:
    """(kind, name, data-or-linkname) -> a tar; kinds: file, dir, symlink, hardlink, chr, fifo."""
    with tarfile.open(path, "w") as tar:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = extra if isinstance(extra, bytes) else b"x"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = str(extra)
            if kind == "dir":
                info.mode = 0o755
            tar.addfile(info)
    return path


MALICIOUS = {
    "absolute path": ([("dir", "tiny", None), ("file", "/tmp/edgekit-evil", b"x")], "'/tmp/edgekit-evil' has an absolute path"),
    "dot-dot": ([("dir", "tiny", None), ("file", "tiny/../../evil.txt", b"x")], "'tiny/../../evil.txt' has a '..' component"),
    "symlink out": ([("dir", "tiny", None), ("symlink", "tiny/passwd", "../../../etc/passwd")],
                    "'tiny/passwd' is a symbolic link to '../../../etc/passwd', which leaves the bundle"),
    "absolute symlink": ([("dir", "tiny", None), ("symlink", "tiny/passwd", "/etc/passwd")],
                         "'tiny/passwd' is a symbolic link to '/etc/passwd', which leaves the bundle"),
    "hardlink up": ([("dir", "tiny", None), ("hardlink", "tiny/x", "../x")], "'tiny/x' is a hard link to '../x', which leaves"),
    "hardlink out": ([("dir", "tiny", None), ("hardlink", "tiny/shadow", "etc/shadow")],
                     "'tiny/shadow' is a hard link to 'etc/shadow', which leaves the bundle"),
    "link inside": ([("dir", "tiny", None), ("file", "tiny/a", b"a"), ("symlink", "tiny/b", "a")],
                    "'tiny/b' is a symbolic link .* holds only files and directories"),
    "device node": ([("dir", "tiny", None), ("chr", "tiny/null", None)], "'tiny/null' is a device node"),
    "fifo": ([("dir", "tiny", None), ("fifo", "tiny/pipe", None)], "'tiny/pipe' is a FIFO"),
    "two top dirs": ([("dir", "tiny", None), ("file", "tiny/a", b"a"), ("file", "other/b", b"b")],
                     "'other/b' is outside the archive's single top directory 'tiny'"),
    "file at top": ([("file", "evil.sh", b"x")], "'evil.sh' is a file at the top level"),
    "duplicate": ([("file", "tiny/a", b"a"), ("file", "tiny/a", b"b")], "'tiny/a' appears twice"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_safe_extract_refuses_malicious_archives_and_leaves_nothing(case, tmp_path):
    members, message = MALICIOUS[case]
    archive = _tar(tmp_path / "evil.tar", members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(EdgekitError, match=f"unsafe bundle archive: member {message}"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "evil.tar"]


def test_unpack_checks_before_the_bundle_appears(bundle, keys, tmp_path, monkeypatch):
    # a tar whose weights were altered (the manifest's sha256 no longer matches): refused, nothing left
    tampered = tmp_path / "tampered" / "tiny"
    shutil.copytree(bundle, tampered)
    _flip_byte(tampered / "model.onnx_data")
    write_tar(tampered, tmp_path / "tampered.tar")
    dest = tmp_path / "device"
    with pytest.raises(EdgekitError, match="model.onnx_data does not match its sha256 in manifest.json"):
        api.unpack_bundle(tmp_path / "tampered.tar", dest)
    assert list(dest.iterdir()) == []
    # an intact but unsigned tar: fine without trusted keys, refused with them
    unsigned = tmp_path / "unsigned" / "tiny"
    shutil.copytree(bundle, unsigned)
    (unsigned / SIGNATURE_NAME).unlink()
    write_tar(unsigned, tmp_path / "unsigned.tar")
    _trust(monkeypatch, keys["publisher"]["public"])
    with pytest.raises(SignatureError, match="unsigned bundle"):
        api.unpack_bundle(tmp_path / "unsigned.tar", dest)
    assert list(dest.iterdir()) == []
    result = api.unpack_bundle(bundle.parent / "tiny.tar", dest)  # the tar sign_bundle rewrote
    assert result["signature"]["key_id"] == keys["publisher"]["key_id"]
    assert result["files"] == len(json.loads((bundle / "manifest.json").read_text())["files"])
    assert verify_manifest_files(dest / "tiny")[0] == result["files"]
    # truncated archives, cut inside a member's data and at a header boundary (which tarfile
    # alone would read as a shorter, complete archive): a clear error, nothing half-written
    data = (bundle.parent / "tiny.tar").read_bytes()
    with tarfile.open(bundle.parent / "tiny.tar") as tar:
        boundary = tar.getmembers()[5].offset
    for cut in (len(data) // 2, boundary):
        (tmp_path / "short.tar").write_bytes(data[:cut])
        with pytest.raises(EdgekitError, match="damaged or truncated"):
            safe_extract(tmp_path / "short.tar", tmp_path / "short")
        assert not (tmp_path / "short").exists() or list((tmp_path / "short").iterdir()) == []


def test_unsigned_device_built_files_are_named_on_unpack_verify_and_load(bundle, keys, tmp_path, monkeypatch, caplog):
    import logging

    pub = keys["publisher"]["public"]
    signed = verify_bundle(bundle, [pub]).files
    # what build-engine adds on a device, recorded in the manifest's table as it records it
    (bundle / "engine").mkdir()
    (bundle / "engine" / "jetson-orin-nano-8gb.plan").write_bytes(b"engine built on the device")
    (bundle / "build_engine.sh").write_text("#!/bin/sh\n")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in ("engine/jetson-orin-nano-8gb.plan", "build_engine.sh"):
        data = (bundle / rel).read_bytes()
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    unsigned = ["build_engine.sh", "engine/jetson-orin-nano-8gb.plan"]
    runner = CliRunner()

    verified = runner.invoke(main, ["verify", str(bundle), "--key", pub])
    assert verified.exit_code == 0, verified.output
    head, *rest = verified.stdout.splitlines()
    assert head.startswith(f"verified: {signed} files") and f"signed by {keys['publisher']['key_id']}" in head
    assert not any(rel in head for rel in unsigned)  # never under "signed by"
    assert rest == ["  unsigned (device-built, not covered by the signature): 2 file(s)", *(f"    {rel}" for rel in unsigned)]

    write_tar(bundle, tmp_path / "built.tar")
    _trust(monkeypatch, pub)
    unpacked = runner.invoke(main, ["unpack", str(tmp_path / "built.tar"), str(tmp_path / "device")])
    assert unpacked.exit_code == 0, unpacked.output
    head, *rest = unpacked.stdout.splitlines()
    total = len(manifest["files"])
    assert f": {total} files (" in head and f"{signed} of them signed by {keys['publisher']['key_id']}" in head
    assert rest == ["  unsigned (device-built, not covered by the signature): 2 file(s)", *(f"    {rel}" for rel in unsigned)]
    assert "warning:" not in unpacked.output  # named once, by the command

    # loading (the runtime, build-engine, check all go through require_trusted): a warning naming them
    with caplog.at_level(logging.WARNING, logger="edgekit.signing"):
        report = require_trusted(tmp_path / "device" / "tiny")
    assert report.unsigned == unsigned
    messages = [r.getMessage() for r in caplog.records if r.name == "edgekit.signing"]
    assert len(messages) == 1 and messages[0].startswith("warning: 2 unsigned file(s) in ")
    assert messages[0].endswith(f"not covered by the signature of {keys['publisher']['key_id']}: {', '.join(unsigned)}")


def test_a_signature_payload_with_an_unsafe_path_is_refused(bundle, keys, tmp_path):
    from edgekit.bundle.signing import _safe_rel

    for rel in ("../x", "/etc/passwd", "a//b", "a\\b", "", ".hidden", "x\x00", "n" * 129, "sub/./x"):
        assert not _safe_rel(rel), rel
    assert _safe_rel("engine/ort-jetson-orin-nano-8gb/cache.engine")
    # a manifest row that would leave the bundle: sign refuses it by name
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgekitError, match=r"invalid file name in manifest\.json '\.\./outside\.txt'"):
        sign_bundle(bundle, keys["publisher"]["private"])
