"""`edgekit deploy` against a real OpenSSH server on loopback playing the device.

The fixture starts /usr/sbin/sshd (as this user, on a free port, with its own host key,
client key and known_hosts); the device's Python is this test's interpreter (it has the
runtime's dependencies), so the runtime install compiles the C fast path for real and
build-engine / validate run for real there. Without sshd/ssh/rsync the tests are skipped
with the reason, unless EDGEKIT_REQUIRE_SSHD=1 (CI: `make test`), where that is a failure.

One session "device root" holds the runtime (installed once, by the first deploy); each
test deploys bundles of its own name into it, so tests do not see each other's versions.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compress_tiny_bundle, run_cli

from edgekit.errors import DeployError

SSHD = "/usr/sbin/sshd"
REQUIRE = os.environ.get("EDGEKIT_REQUIRE_SSHD") == "1"
PAD_BYTES = 64 * 2**20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Device:
    """The loopback sshd: where it listens and the client-side files to reach it."""

    def __init__(self, base: Path, port: int):
        self.base, self.port = base, port
        self.user = getpass.getuser()
        self.host = f"{self.user}@127.0.0.1:{port}"
        self.identity = base / "client_key"
        self.known_hosts = base / "known_hosts"
        self.host_key_line = f"[127.0.0.1]:{port} " + " ".join((base / "host_key.pub").read_text().split()[:2])
        # The runtime sdist of this checkout, built once (the real build, into the edgekit cache).
        # Passing it as --runtime keeps the runtime's key fixed for the session even if the
        # sources change meanwhile (the key is a hash of the sources inside).
        from edgekit.deploy.runtime_dist import build_sdist
        from edgekit.pipeline.runner import default_cache_dir

        self.runtime = str(build_sdist(default_cache_dir()).path)

    def deploy(self, bundle: Path | str, root: Path, **kw) -> dict:
        from edgekit import api

        kw.setdefault("hosts", [self.host])
        kw.setdefault("python", sys.executable)
        kw.setdefault("runtime", self.runtime)
        kw.setdefault("identity", str(self.identity))
        kw.setdefault("known_hosts", str(self.known_hosts))
        records = api.deploy(bundle, remote_root=str(root), **kw)
        return records[0] if len(records) == 1 else records

    def cli_args(self, root: Path) -> list[str]:
        return ["--identity", str(self.identity), "--known-hosts", str(self.known_hosts), "--remote-root", str(root),
                "--python", sys.executable, "--runtime", self.runtime]


@pytest.fixture(scope="session")
def device(tmp_path_factory):
    missing = [tool for tool in ("ssh", "ssh-keygen", "rsync") if shutil.which(tool) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        reason = f"needs OpenSSH (server and client) and rsync; missing: {', '.join(missing)} (apt install openssh-server rsync)"
        if REQUIRE:
            pytest.fail(reason + " — EDGEKIT_REQUIRE_SSHD=1")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
    shutil.copy(base / "client_key.pub", base / "authorized_keys")
    port = _free_port()
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host_key\nAuthorizedKeysFile {base}/authorized_keys\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PermitRootLogin prohibit-password\nPidFile {base}/sshd.pid\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = open(base / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(base / 'sshd.log').read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("sshd did not listen within 20 s")
            time.sleep(0.05)
    device = Device(base, port)
    device.known_hosts.write_text(device.host_key_line + "\n")
    yield device
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("deploy-bundle"), tiny_model_dir)


def variant(base: Path, dest: Path, name: str, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of ``base`` named ``name`` with ``extra`` files, its manifest's table rewritten."""
    from edgekit.bundle.manifest import bundle_files

    shutil.copytree(base, dest)
    for rel, data in (extra or {}).items():
        (dest / rel).write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["name"] = name
    manifest["files"] = bundle_files(dest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


@pytest.fixture(scope="session")
def installed(device, tiny_bundle, tmp_path_factory):
    """The session's device root after the first deploy (which installs the runtime there)."""
    root = tmp_path_factory.mktemp("device") / "edgekit root"  # a space: paths are quoted everywhere
    return root, device.deploy(tiny_bundle, root)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _current(root: Path, name: str) -> str | None:
    link = root / "bundles" / name / "current"
    return os.readlink(link) if link.is_symlink() else None


# --- deploy, runtime, re-deploy -----------------------------------------------------------


def test_deploy_lays_out_versions_and_installs_the_runtime(device, tiny_bundle, installed):
    root, first = installed
    assert first["status"] == "deployed", first["error"]
    version = first["version"]
    assert len(version) == 12 and first["previous"] is None and first["machine"] and first["python"]
    bundles = root / "bundles" / "tiny"
    assert _current(root, "tiny") == version
    assert _tree(bundles / version) == _tree(tiny_bundle)  # byte-identical, nothing more
    record = json.loads((bundles / ".records" / f"{version}.json").read_text())
    assert record["uploaded_manifest_sha256"] == record["manifest_sha256"]
    assert first["bytes_literal"] >= sum(len(b) for b in _tree(tiny_bundle).values()) * 0.9
    # The runtime: installed with pip --target, C fast path compiled on the device, the wrapper works.
    assert first["runtime"] == "installed" and first["fastpath"] is True and first["warnings"] == []
    runtimes = [p for p in (root / "runtime").iterdir() if not p.name.startswith(".")]
    assert len(runtimes) == 1 and list((runtimes[0] / "edgekit" / "runtime").glob("_fastpath*.so"))
    wrapper = root / "bin" / "edgekit"
    # (run from this checkout's root: the runtime, not the edgekit/ in the working directory, must answer)
    code = "import edgekit, edgekit.runtime._fastpath as f; print(edgekit.__file__, f.__file__)"
    checkout = Path(__file__).resolve().parent.parent
    version_out = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, cwd=checkout,
                                 env={"PATH": os.environ["PATH"], "PYTHONVERBOSE": "1"})  # -v: where each module came from
    assert version_out.returncode == 0 and version_out.stdout.startswith("edgekit, version 0.1.0"), version_out.stderr[-2000:]
    assert f"{runtimes[0]}/edgekit/cli.py" in version_out.stderr and f"{checkout}/edgekit/cli.py" not in version_out.stderr
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(runtimes[0])},
                           cwd=root)
    assert probe.returncode == 0 and probe.stdout.count(str(runtimes[0])) == 2, probe.stderr

    again = device.deploy(tiny_bundle, root)
    assert again["status"] == "up-to-date" and again["version"] == version and again["runtime"] == "present"
    assert again["bytes_sent"] == 0 and again["runtime_bytes_sent"] == 0
    assert _current(root, "tiny") == version


def test_a_tampered_file_on_the_device_is_found_and_repaired(device, tiny_bundle, installed, tmp_path):
    root, _ = installed
    bundle = variant(tiny_bundle, tmp_path / "tamper", "tamper")
    first = device.deploy(bundle, root)
    version = first["version"]
    target = root / "bundles" / "tamper" / version / "model.onnx_data"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    second = device.deploy(bundle, root)
    assert second["status"] == "deployed" and second["version"] == version
    assert len(second["warnings"]) == 1
    warning = second["warnings"][0]
    assert "model.onnx_data: sha256 mismatch" in warning and "quarantined" in warning
    # Only the damaged block travelled; the rest was rebuilt from the bad copy on the device.
    assert second["bytes_literal"] < 64 * 1024 and second["bytes_matched"] >= len(data) - 64 * 1024
    assert _tree(root / "bundles" / "tamper" / version) == _tree(bundle)
    quarantined = list((root / "bundles" / "tamper" / ".quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(version)
    assert (quarantined[0] / "model.onnx_data").read_bytes() == bytes(data)
    assert _current(root, "tamper") == version


def test_an_interrupted_upload_resumes(device, tiny_bundle, installed, tmp_path, tmp_path_factory, monkeypatch):
    root, _ = installed
    small = device.deploy(variant(tiny_bundle, tmp_path / "v1", "resume"), root)
    assert small["status"] == "deployed"
    padded = variant(tiny_bundle, tmp_path / "v2", "resume", {"pad.bin": os.urandom(PAD_BYTES)})
    incoming = root / "bundles" / "resume" / ".incoming"

    # A deploy over a slow link (rsync --bwlimit 12 MiB/s), killed with its whole process group
    # (edgekit, ssh, rsync) once a third of the padding is on the device.
    local_tmp = tmp_path_factory.mktemp("s")
    slow = subprocess.Popen([sys.executable, "-m", "edgekit", "deploy", str(padded), "--host", device.host, "-q",
                             *device.cli_args(root)],
                            # TMPDIR: the killed ssh master's control socket directory stays with the test's files
                            env=dict(os.environ, EDGEKIT_DEPLOY_BWLIMIT="12288", TMPDIR=str(local_tmp)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def on_device() -> int:
        return sum(p.stat().st_size for p in incoming.rglob("*") if p.is_file()) if incoming.is_dir() else 0

    deadline = time.monotonic() + 120
    while on_device() < PAD_BYTES // 3:
        assert slow.poll() is None, f"the slow deploy ended early: {slow.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the upload did not progress"
        time.sleep(0.05)
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait()
    # The device's rsync keeps what it received as a partial file once its connection drops.
    deadline = time.monotonic() + 30
    while not list(incoming.rglob(".rsync-partial/pad.bin")):
        assert time.monotonic() < deadline, f"no partial file kept: {sorted(p.name for p in incoming.rglob('*'))}"
        time.sleep(0.05)
    kept = on_device()
    assert kept >= PAD_BYTES // 3
    assert _current(root, "resume") == small["version"]  # the previous version still runs
    assert not (root / "bundles" / "resume" / padded_version(padded)).exists()

    # What the killed edgekit left here: its ssh control directory only (the file list goes to rsync on its stdin).
    left = [p.name for p in local_tmp.iterdir()]
    assert left == [p.name for p in local_tmp.glob(f"ek-ssh-{slow.pid}-*")] and len(left) == 1, left
    (local_tmp / "unrelated").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(local_tmp))
    resumed = device.deploy(padded, root)
    assert resumed["status"] == "deployed" and resumed["previous"] == small["version"], resumed["error"]
    assert [p.name for p in local_tmp.iterdir()] == ["unrelated"]  # the next deploy removed the stale one
    # The bytes already on the device were not sent again (rsync rebuilt them from the partial file).
    assert resumed["bytes_matched"] >= PAD_BYTES // 3 - 2**20
    assert resumed["bytes_literal"] <= PAD_BYTES - PAD_BYTES // 3 + 2**20
    assert resumed["bytes_sent"] < PAD_BYTES * 0.75
    assert _current(root, "resume") == resumed["version"]
    assert _tree(root / "bundles" / "resume" / resumed["version"]) == _tree(padded)
    assert not incoming.exists() or not any(incoming.iterdir())


def padded_version(bundle: Path) -> str:
    from edgekit.deploy.deploy import load_bundle

    return load_bundle(bundle).content_version


def test_a_failed_verification_leaves_the_previous_version_running(device, tiny_bundle, installed, tmp_path):
    root, _ = installed
    good = device.deploy(variant(tiny_bundle, tmp_path / "good", "verify"), root)
    newer = variant(tiny_bundle, tmp_path / "newer", "verify", {"notes.txt": b"a newer bundle\n"})
    # The device's rsync "receives" a damaged file: a wrapper (--rsync-path) flips a byte after the transfer.
    flip = tmp_path / "damaging-rsync"
    flip.write_text(
        "#!/bin/sh\nrsync \"$@\"\nrc=$?\n"
        f"{sys.executable} -c 'import glob\nfor p in glob.glob(\"{root}/bundles/verify/.incoming/*/tokenizer.json\"):\n"
        "    b = bytearray(open(p, \"rb\").read()); b[10] ^= 1; open(p, \"wb\").write(b)'\nexit $rc\n"
    )
    flip.chmod(0o755)
    failed = device.deploy(newer, root, rsync_path=str(flip))
    assert failed["status"] == "failed"
    assert "tokenizer.json: sha256 mismatch" in failed["error"] and "failed verification" in failed["error"]
    assert _current(root, "verify") == good["version"]
    assert not (root / "bundles" / "verify" / failed["version"]).exists()
    assert (root / "bundles" / "verify" / ".incoming" / failed["version"]).is_dir()  # kept: the next deploy resumes

    fixed = device.deploy(newer, root)
    assert fixed["status"] == "deployed" and fixed["previous"] == good["version"]
    assert fixed["bytes_literal"] < 64 * 1024  # only tokenizer.json's damaged block was sent again
    assert _tree(root / "bundles" / "verify" / fixed["version"]) == _tree(newer)

    # Rollback: current back to the good version (verified first), previous to the newer one.
    back = device.deploy("verify", root, rollback=True)
    assert back["status"] == "rolled-back" and back["version"] == good["version"] and back["previous"] == fixed["version"]
    assert _current(root, "verify") == good["version"]


def test_a_signed_bundle_is_its_own_version_and_its_signature_travels(device, tiny_bundle, installed, tmp_path):
    from edgekit import api
    from edgekit.bundle.signing import verify_bundle

    root, _ = installed
    bundle = variant(tiny_bundle, tmp_path / "signed", "signed")
    unsigned = device.deploy(bundle, root)
    keys = api.keygen(tmp_path / "publisher.key")
    api.sign_bundle(bundle, keys["private"])
    signed = device.deploy(bundle, root)
    # Same manifest, now with a signature: a new version (a device with trusted keys treats them differently).
    assert signed["status"] == "deployed" and signed["version"] != unsigned["version"]
    deployed = root / "bundles" / "signed" / signed["version"]
    assert (deployed / "signature.json").read_bytes() == (bundle / "signature.json").read_bytes()
    assert verify_bundle(deployed, [keys["public"]]).key_id == keys["key_id"]
    # signature.json is checked like every other file.
    (deployed / "signature.json").write_text("{}")
    again = device.deploy(bundle, root)
    assert again["status"] == "deployed" and "signature.json: sha256 mismatch" in again["warnings"][0]


def test_old_versions_are_pruned_but_never_current_or_previous(device, tiny_bundle, installed, tmp_path):
    root, _ = installed
    versions = []
    for i in range(3):
        result = device.deploy(variant(tiny_bundle, tmp_path / f"v{i}", "prune", {"n.txt": b"%d" % i}), root, keep=2)
        assert result["status"] == "deployed"
        versions.append(result["version"])
    bundles = root / "bundles" / "prune"
    on_device = sorted(p.name for p in bundles.iterdir() if not p.name.startswith(".") and not p.is_symlink())
    assert on_device == sorted(versions[1:])
    assert _current(root, "prune") == versions[2] and os.readlink(root / "bundles" / "prune" / "previous") == versions[1]
    assert not (root / "bundles" / "prune" / ".records" / f"{versions[0]}.json").exists()


# --- host keys, fleets, input errors --------------------------------------------------------


@pytest.mark.parametrize("known", ["changed", "unknown"])
def test_a_bad_host_key_is_refused(device, tiny_bundle, tmp_path, known):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known_hosts = tmp_path / "known_hosts"
    if known == "changed":
        known_hosts.write_text(f"[127.0.0.1]:{device.port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2]) + "\n")
    else:
        known_hosts.write_text("")
    before = known_hosts.read_text()
    root = tmp_path / "root"
    result = device.deploy(tiny_bundle, root, known_hosts=str(known_hosts))
    assert result["status"] == "failed" and "\n" not in result["error"]
    assert "host key verification failed" in result["error"] and "refused" in result["error"]
    assert ("differs from the one" if known == "changed" else "no host key for") in result["error"]
    assert "ssh-keyscan -p" in result["error"]
    assert not root.exists()  # nothing ran on the device
    assert known_hosts.read_text() == before  # and the known_hosts file was not touched


def test_a_wrong_key_or_a_missing_python_fails_with_one_line(device, tiny_bundle, tmp_path):
    root = tmp_path / "root"
    auth = device.deploy(tiny_bundle, root, identity=str(device.base / "host_key"))  # a key the device does not accept
    assert auth["status"] == "failed" and auth["error"].startswith("authentication failed") and "--identity" in auth["error"]
    python = device.deploy(tiny_bundle, root, python="/opt/no such/python3")
    assert python["status"] == "failed" and "\n" not in python["error"]
    assert python["error"].startswith("cannot run the Python interpreter '/opt/no such/python3' on the device")
    assert not root.exists()


def test_a_fleet_with_one_host_down_reports_both(device, tiny_bundle, installed, tmp_path):
    root, _ = installed
    bundle = variant(tiny_bundle, tmp_path / "fleet", "fleet")
    down = _free_port()
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"# the fleet\n{device.host}   python={sys.executable}\n\n{device.user}@127.0.0.1:{down}  # switched off\n")
    args = ["--identity", str(device.identity), "--known-hosts", str(device.known_hosts), "--remote-root", str(root)]
    result = run_cli("deploy", str(bundle), "--hosts", str(hosts), "--json", *args)
    assert result.returncode == 1, result.stderr
    records = {r["host"]: r for r in json.loads(result.stdout)}
    assert set(records) == {device.host, f"{device.user}@127.0.0.1:{down}"}
    good, bad = records[device.host], records[f"{device.user}@127.0.0.1:{down}"]
    assert good["status"] == "deployed" and good["error"] is None
    assert bad["status"] == "failed" and f"connection refused on port {down}" in bad["error"]
    assert _current(root, "fleet") == good["version"]
    # Without --json: the per-host table on stdout.
    table = run_cli("deploy", str(bundle), "--hosts", str(hosts), "-q", *args)
    assert table.returncode == 1
    assert "up-to-date" in table.stdout and "failed" in table.stdout and "connection refused" in table.stdout


def test_hosts_file_errors_are_one_line_with_file_and_line(tmp_path, tiny_bundle):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("nvidia@orin-01\nnvidia@orin-02 identiy=~/.ssh/k\n")
    result = run_cli("deploy", str(tiny_bundle), "--hosts", str(hosts))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown field 'identiy=~/.ssh/k'")
    assert f"({hosts}:2)" in lines[0] and "To resolve," in lines[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("nvidia@orin-01\nnvidia@-oProxyCommand=touch\n", "invalid host name '-oProxyCommand=touch'"),
        ("orin:70000\n", "invalid port '70000'"),
        ("fd00::1\n", "an IPv6 address needs brackets"),
        ("orin-01\norin-01  # again\n", "orin-01 is listed twice (first on line 1)"),
        ("orin-01 python='/usr/bin/py\n", "cannot split the line"),
        ("# nothing here\n", "the hosts file lists no host"),
    ],
)
def test_hosts_file_parsing(tmp_path, text, message):
    from edgekit.deploy.hosts import read_hosts_file

    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(DeployError) as info:
        read_hosts_file(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_hosts_file_fields():
    from edgekit.deploy.hosts import parse_host

    spec = parse_host("nvidia@[fd00::12]:2222", where="x")
    assert (spec.user, spec.host, spec.port, spec.label, spec.rsync_destination) == (
        "nvidia", "fd00::12", 2222, "nvidia@[fd00::12]:2222", "nvidia@[fd00::12]")
    assert parse_host("orin", where="x").with_defaults(port=22, identity=None, python="python3", root="~/e").port == 22


def test_deploy_refuses_a_damaged_local_bundle_before_connecting(tmp_path, tiny_bundle):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer.json").write_text("{}")
    result = run_cli("deploy", str(bundle), "--host", "nobody@127.0.0.1:1")
    assert result.returncode == 2 and "tokenizer.json does not match its sha256" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- build-engine and validate on the device ------------------------------------------------


def test_build_engine_and_validate_run_on_the_device(device, tiny_bundle, installed, tmp_path):
    root, _ = installed
    bundle = variant(tiny_bundle, tmp_path / "engine", "engine")
    reports = tmp_path / "reports"
    # A per-token budget no machine meets: validate exits 1 there, which is "deployed, budget breached".
    result = device.deploy(bundle, root, build_engine=True, validate=True, reports_dir=str(reports),
                           validate_args=["--requests", "2", "--max-new-tokens", "4", "--budget-latency-ms", "0.001"])
    assert result["status"] == "deployed", result["error"]
    version = result["version"]
    assert version.endswith("-engine") and result["engine"]
    deployed = root / "bundles" / "engine" / version
    manifest = json.loads((deployed / "manifest.json").read_text())
    assert "engines" in manifest and any(rel.startswith("engine/") for rel in manifest["files"])
    assert (deployed / "build_engine.sh").is_file()  # no TensorRT here: the device build script
    # validate ran there and its report came back here.
    assert result["validate"]["verdict"] == "breached" and result["validate"]["exit_code"] == 1, result["validate"]
    local = Path(result["validate"]["report"])
    assert local == reports / device.host.replace(":", "_") / "engine" / version / "validate"
    report = json.loads((local / "validate.json").read_text())
    assert report["passed"] is False and (local / "validate.html").is_file()
    from edgekit.deploy.deploy import HostResult
    from edgekit.deploy.fleet import exit_code

    assert exit_code([HostResult(**result)]) == 1  # a breached budget fails `edgekit deploy --validate`
    # The engine-built version verifies against its record on a re-deploy.
    again = device.deploy(bundle, root, build_engine=True)
    assert again["status"] == "up-to-date" and again["warnings"] == []


# --- a full disk, temp files, re-deploys ----------------------------------------------------


@pytest.fixture
def small_disk():
    """mount(path, size): a tmpfs of ``size`` at ``path`` (a real full disk for the device);
    skipped where this user cannot mount one (not root)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a small tmpfs (the out-of-space refusal is tested without it too)")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``directory`` (an unrelated file) until ``leave`` bytes are free."""
    filler = directory / "someone-elses-file.bin"
    with open(filler, "ab") as handle:
        try:
            while True:
                st = os.statvfs(directory)
                room = st.f_bavail * st.f_frsize - leave
                if room <= 0:
                    break
                handle.write(b"\0" * min(room, 2**20))
                handle.flush()
        except OSError:
            pass
    return filler


def _leftovers(path: Path) -> list[str]:
    """Temporary entries of ours: records/link temp files, trash folders, rsync temp files."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if ".tmp-" in p.name or p.name.startswith((".trash-", "ek-ssh-", "edgekit-files-"))
                  or (p.name.startswith(".") and p.name[1:].split(".")[0] in ("pad", "model", "tokenizer")))


@pytest.fixture
def local_tmp(tmp_path_factory, monkeypatch) -> Path:
    """This process's temp directory, for what a deploy writes locally (ssh control sockets;
    a short path: a unix socket's is limited to ~100 bytes)."""
    path = tmp_path_factory.mktemp("lt")
    monkeypatch.setattr("tempfile.tempdir", str(path))
    return path


def test_too_little_free_space_is_refused_before_uploading(device, tiny_bundle, installed, tmp_path, monkeypatch):
    root, _ = installed
    bundle = variant(tiny_bundle, tmp_path / "nospace", "nospace")
    monkeypatch.setenv("EDGEKIT_DEPLOY_TEST_FREE_BYTES", str(100 * 1024))  # the agent's statvfs, overridden (tests only)
    result = device.deploy(bundle, root)
    assert result["status"] == "failed" and result["bytes_sent"] == 0
    error = result["error"]
    assert re.match(r"the device is out of space: 0\.1 MiB free on the filesystem of .*/bundles/nospace, this deploy needs "
                    r"1\.\d MiB \(.*\)\. To resolve, free at least 1\.\d MiB more there", error), error
    assert "broken pipe" not in error.lower() and "run the deploy again" not in error
    assert not (root / "bundles" / "nospace" / ".incoming" / result["version"]).exists()  # nothing prepared, nothing sent


def test_a_full_disk_is_named_with_what_is_needed_and_a_redeploy_works(device, tiny_bundle, installed, tmp_path,
                                                                       small_disk, local_tmp):
    root, _ = installed
    disk = small_disk(root / "bundles" / "full", "16m")
    small = device.deploy(variant(tiny_bundle, tmp_path / "small", "full"), root)
    assert small["status"] == "deployed", small["error"]
    padded = variant(tiny_bundle, tmp_path / "padded", "full", {"pad.bin": os.urandom(4 * 2**20)})
    # The device's disk fills up during the upload: a --rsync-path wrapper fills it (an unrelated
    # file) before the device's rsync starts receiving.
    filling = tmp_path / "filling-rsync"
    filling.write_text(f"#!/bin/sh\n{sys.executable} -c 'import sys; sys.path.insert(0, \"{Path(__file__).parent}\"); "
                       f"from test_deploy import _fill; from pathlib import Path; _fill(Path(\"{disk}\"), 256 * 1024)'\n"
                       "exec rsync \"$@\"\n")
    filling.chmod(0o755)
    failed = device.deploy(padded, root, rsync_path=str(filling))
    assert failed["status"] == "failed"
    error = failed["error"]
    assert error.startswith("the device is out of space (No space left on device during the upload): "), error
    assert re.search(r"MiB free on the filesystem of .*/bundles/full, this deploy needs 5\.\d MiB", error), error
    assert "broken pipe" not in error.lower() and "resumes" not in error
    # the partial upload that filled the disk is gone; the unrelated file is not; current is untouched
    assert not (disk / ".incoming" / failed["version"]).exists() and (disk / "someone-elses-file.bin").is_file()
    assert _current(root, "full") == small["version"]
    assert _leftovers(disk) == [] and _leftovers(local_tmp) == []

    (disk / "someone-elses-file.bin").unlink()
    done = device.deploy(padded, root)
    assert done["status"] == "deployed" and done["previous"] == small["version"], done["error"]

    # The disk full again: versions already on the device are switched to, and re-deploys are up to date.
    _fill(disk)
    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize < 64 * 1024
    back = device.deploy(variant(tiny_bundle, tmp_path / "small2", "full"), root)
    assert back["status"] == "deployed" and back["version"] == small["version"] and back["bytes_sent"] == 0, back["error"]
    assert _current(root, "full") == small["version"]
    again = device.deploy(padded, root)
    assert again["status"] == "deployed" and again["bytes_sent"] == 0 and _current(root, "full") == done["version"]
    assert device.deploy(padded, root)["status"] == "up-to-date"
    assert _leftovers(disk) == [] and _leftovers(local_tmp) == []


def test_a_too_small_disk_is_refused_before_anything_is_sent(device, tiny_bundle, installed, tmp_path, small_disk, local_tmp):
    root, _ = installed
    disk = small_disk(root / "bundles" / "tiny-disk", "2m")
    padded = variant(tiny_bundle, tmp_path / "padded", "tiny-disk", {"pad.bin": os.urandom(4 * 2**20)})
    result = device.deploy(padded, root)
    assert result["status"] == "failed" and result["bytes_sent"] == 0
    assert re.match(r"the device is out of space: 2\.0 MiB free on the filesystem of .*/bundles/tiny-disk, this deploy "
                    r"needs 5\.\d MiB .*To resolve, free at least 3\.\d MiB more there", result["error"]), result["error"]
    assert list(disk.iterdir()) == [] and _leftovers(local_tmp) == []


def test_temporary_entries_of_killed_agents_are_removed_and_nothing_else(device, tiny_bundle, installed, tmp_path):
    root, _ = installed
    bundle = variant(tiny_bundle, tmp_path / "stale", "stale")
    first = device.deploy(bundle, root)
    bundles = root / "bundles" / "stale"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    planted = [bundles / f".current.tmp-{dead.pid}", bundles / ".records" / f"{first['version']}.json.tmp-{dead.pid}",
               bundles / ".incoming" / f".trash-0123456789ab-{dead.pid}"]
    planted[0].symlink_to("/etc")
    planted[1].write_text("{")
    (planted[2] / "sub").mkdir(parents=True)
    kept = [bundles / "notes.txt", bundles / f".current.tmp-{os.getpid()}", bundles / ".records" / "by-hand.json.bak"]
    for path in kept:
        path.write_text("mine")
    again = device.deploy(variant(tiny_bundle, tmp_path / "stale2", "stale", {"n.txt": b"2"}), root)
    assert again["status"] == "deployed", again["error"]
    assert not any(os.path.lexists(p) for p in planted) and Path("/etc").is_dir()
    assert all(p.read_text() == "mine" for p in kept)


# --- names ----------------------------------------------------------------------------------


BAD_NAMES = {"traversal": "../../etc", "absolute": "/etc", "NUL": "ti\x00ny", "slash": "a/b", "dot-dot": "..",
             "empty": "", "over-long": "n" * 129, "leading dot": ".hidden", "leading dash": "-oProxyCommand=x",
             "newline": "tiny\n"}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_a_bad_bundle_name_is_refused_before_connecting(case, tiny_bundle, tmp_path):
    from edgekit.deploy.deploy import load_bundle
    from edgekit.deploy.fleet import _bundle_name

    bundle = variant(tiny_bundle, tmp_path / "b", "tiny")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["name"] = BAD_NAMES[case]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeployError, match="invalid bundle name in manifest.json"):
        load_bundle(bundle)
    with pytest.raises(DeployError, match="invalid bundle name"):
        _bundle_name(bundle)  # --rollback BUNDLE_DIR
    if case not in ("empty", "absolute", "dot-dot", "traversal"):  # those name existing paths here
        with pytest.raises(DeployError, match="invalid bundle name"):
            _bundle_name(BAD_NAMES[case])  # --rollback NAME


def test_a_bad_manifest_row_is_refused_before_connecting(tiny_bundle, tmp_path):
    from edgekit.deploy.deploy import load_bundle

    for rel in ("../outside", "/etc/passwd", "a\\b", "", "sub//x", ".ssh/authorized_keys", "x" * 200):
        bundle = variant(tiny_bundle, tmp_path / f"b{len(rel)}-{abs(hash(rel))}", "tiny")
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["files"][rel] = {"sha256": "0" * 64, "size": 1}
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(Exception, match="invalid file name in manifest.json"):
            load_bundle(bundle)


def test_the_agent_refuses_unsafe_names_and_paths(tmp_path, monkeypatch):
    """The device side's own (stdlib) checks, called directly: as strict as edgekit.names."""
    import edgekit.deploy.agent as agent

    root = tmp_path / "root"
    (root / "bundles" / "tiny").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    monkeypatch.setattr(agent, "SERVED_ROOT", str(root))
    base = {"root": str(root), "name": "tiny", "version": "0123456789ab"}
    for bad in BAD_NAMES.values():
        for op, payload in (("discard", {}), ("free", {}), ("rollback", {}),
                            ("finish", {"uploaded": False, "keep": 3})):
            with pytest.raises(agent.Refused, match="invalid bundle name"):
                agent.OPERATIONS[op](dict(base, name=bad, **payload))
    for bad in ("../x", "0123456789ab\n", "0123456789AB", "0123456789ab-engine/..", "", "current"):
        with pytest.raises(agent.Refused, match="invalid (version|rollback version)"):
            agent.discard(dict(base, version=bad))
        if bad:  # (an empty `to` is "not given": the previous version)
            with pytest.raises(agent.Refused, match="invalid rollback version"):
                agent.rollback(dict(base, to=bad))
    with pytest.raises(agent.Refused, match="is not the root this agent serves"):
        agent.discard(dict(base, root=str(outside)))
    for bad in ("../x", "/etc/passwd", "a/../../b", "a//b", ".ssh/x", "a\\b", "", "x\x00", "x" * 129, "-r"):
        with pytest.raises(agent.Refused, match="invalid file name"):
            agent.prepare({"root": str(root), "dir": str(root / "bundles" / "tiny" / ".incoming" / "v"), "names": [bad]})
    for directory in (str(outside), str(root), str(root / "bundles" / ".." / ".." / "outside"), "/"):
        with pytest.raises(agent.Refused, match="not inside"):
            agent.prepare({"root": str(root), "dir": directory, "names": ["manifest.json"]})
        with pytest.raises(agent.Refused, match="not inside"):
            agent.verify({"root": str(root), "dir": directory})
    with pytest.raises(agent.Refused, match="not inside"):
        agent._remove_tree(str(outside), str(root))
    (root / "bundles" / "tiny" / "escape").symlink_to(outside)
    with pytest.raises(agent.Refused, match="not inside"):
        agent._remove_tree(str(root / "bundles" / "tiny" / "escape" / "precious"), str(root / "bundles" / "tiny"))
    with pytest.raises(agent.Refused, match="invalid runtime key"):
        agent.install_runtime({"root": str(root), "key": "../../x"})
    with pytest.raises(agent.Refused, match="is not in"):
        agent.install_runtime({"root": str(root), "key": "0.1.0-abc", "sdist": str(outside / "edgekit-0.1.0.tar.gz")})
    # a manifest row that leaves the bundle fails verification, naming it
    version_dir = root / "bundles" / "tiny" / "0123456789ab"
    version_dir.mkdir()
    (version_dir / "manifest.json").write_text(json.dumps({"files": {"../../../outside/precious": {"sha256": "0" * 64,
                                                                                                     "size": 4}}}))
    check = agent.verify({"root": str(root), "dir": str(version_dir)})
    assert check["ok"] is False and "invalid file name in manifest.json '../../../outside/precious'" in check["error"]
    assert (outside / "precious").read_text() == "keep"
