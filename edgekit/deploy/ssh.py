"""The OpenSSH client, driven with host-key checking always on.

One :class:`Connection` per device: a master ssh process (``ControlMaster``) authenticates
once; the rsync transfers and remote commands run through its socket, so a deploy costs one
key exchange. The master's remote side is the agent (edgekit/deploy/agent.py): it takes the
deploy lock on the device (``<root>/.lock``: two deploys to one device cannot interleave)
and answers the deploy's steps over the open session, one JSON line each way, until our end
of its stdin closes: a killed ``edgekit`` leaves no ssh process behind and no lock.

ssh options: ``BatchMode=yes`` (never prompt), ``StrictHostKeyChecking=yes`` (an unknown or
changed host key is refused; ``no``/``accept-new`` are never used), ``UpdateHostKeys=no``
(the known_hosts file is never written), ``IdentitiesOnly=yes`` with ``--identity``.
Failures come back as one :class:`DeployError` line (host key changed/unknown, connection
refused, timeout, authentication, name resolution) with what to do about it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.deploy.hosts import HostSpec
from edgekit.errors import DeployError

SERVER_ALIVE = ("-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")
AGENT_RESULT = "edgekit-agent-result "
# The master connection's control socket lives in <tmp>/ek-ssh-<pid>-<random>/ (short: a unix
# socket path is limited to ~100 bytes); a killed edgekit leaves it, the next one removes it.
CONTROL_PREFIX = "ek-ssh-"
STALE_CONTROL_AFTER_S = 24 * 3600


def require_tools() -> None:
    """ssh and rsync on this machine (the device needs rsync too; the probe checks that)."""
    missing = [tool for tool in ("ssh", "rsync") if shutil.which(tool) is None]
    if missing:
        raise DeployError(f"{' and '.join(missing)} not found on this machine", where="PATH",
                          how="install the OpenSSH client and rsync (Debian/Ubuntu: sudo apt install openssh-client rsync)")


@dataclass(frozen=True)
class SshOptions:
    known_hosts: str | None = None
    connect_timeout: int = 10


def ssh_argv(host: HostSpec, options: SshOptions, *, control_path: str | None = None, master: bool = False) -> list[str]:
    """``ssh -o ...`` without the destination (rsync -e takes exactly this)."""
    argv = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={options.connect_timeout}", *SERVER_ALIVE]
    if options.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={options.known_hosts}"]
    if host.port:
        argv += ["-p", str(host.port)]
    if host.identity:
        argv += ["-i", os.path.expanduser(host.identity), "-o", "IdentitiesOnly=yes"]
    if control_path:
        argv += ["-o", f"ControlPath={control_path}", "-o", "ControlMaster=yes" if master else "ControlMaster=no"]
        if master:
            argv += ["-o", "ControlPersist=no"]
    return argv


def classify_failure(stderr: str, host: HostSpec, options: SshOptions, *, step: str = "connect") -> DeployError:
    """ssh's stderr (exit 255) -> one actionable line."""
    text = stderr or ""
    where = host.label
    known = options.known_hosts or "~/.ssh/known_hosts"
    key_name = f"[{host.host}]:{host.port}" if host.port and host.port != 22 else host.host
    scan = f"ssh-keyscan{f' -p {host.port}' if host.port else ''} {host.host}"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "has changed and you have requested strict checking" in text:
        return DeployError(
            f"host key verification failed: the host key of {key_name} differs from the one in {known} "
            "(refused; nothing was sent)",
            where=where,
            how=f"if the device was reinstalled, check its new key's fingerprint on the device (ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub), then ssh-keygen -R '{key_name}' -f {known} and add the new key "
                f"({scan} >> {known})")
    if "Host key verification failed" in text or "No ED25519 host key is known" in text or "host key is known" in text:
        return DeployError(
            f"host key verification failed: no host key for {key_name} in {known} (refused; nothing was sent)",
            where=where,
            how=f"compare `{scan} | ssh-keygen -lf -` with the device's own fingerprint (ssh-keygen -lf "
                f"/etc/ssh/ssh_host_ed25519_key.pub on its console), then add it: {scan} >> {known}; or pass --known-hosts FILE")
    if "Permission denied" in text:
        return DeployError("authentication failed (the device refused our key)", where=where,
                           how="add your public key to the device (ssh-copy-id), or pass --identity FILE with the right key")
    if "Connection refused" in text:
        return DeployError(f"connection refused on port {host.port or 22} (no SSH server listening there)", where=where,
                           how="check the address and port, and that sshd runs on the device (sudo systemctl status ssh)")
    if "Could not resolve hostname" in text:
        return DeployError(f"cannot resolve the host name {host.host}", where=where, how="check the name, or use its IP address")
    if re.search(r"timed out|Connection timed out|Operation timed out", text):
        return DeployError(f"timed out connecting ({options.connect_timeout} s)", where=where,
                           how="check that the device is on and reachable (ping), or raise --connect-timeout")
    if "No route to host" in text or "Network is unreachable" in text:
        return DeployError("no route to the device", where=where, how="check the network and the address")
    if "Connection closed" in text or "Connection reset" in text or "kex_exchange_identification" in text:
        return DeployError(f"the connection was closed during {step}", where=where,
                           how="check sshd on the device (MaxStartups, fail2ban) and retry")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("Warning: Permanently added", "@"))]
    return DeployError(f"ssh failed during {step}: {lines[-1] if lines else 'no message'}", where=where,
                       how="run the same ssh command by hand to see why (ssh -v)")


def clean_stale_control_dirs(tmp_dir: str | None = None) -> list[str]:
    """Remove control-socket directories of edgekit processes that are gone (killed): only
    ``ek-ssh-<pid>-<random>`` directories of this user whose process is not alive (or older
    than a day); nothing else in the temp directory is touched."""
    from edgekit.names import clean_stale_temp_dirs

    base = tmp_dir or tempfile.gettempdir()
    return [str(path) for path in clean_stale_temp_dirs(base, CONTROL_PREFIX, stale_after_s=STALE_CONTROL_AFTER_S)]


_open_connections: set[Connection] = set()
_open_lock = threading.Lock()


def interrupt_all() -> None:
    """Ctrl-C: end every open connection now. Killing a master ends the commands multiplexed
    through it (they hold no connection of their own), and a closed Connection runs nothing more."""
    with _open_lock:
        connections = list(_open_connections)
    for conn in connections:
        conn.interrupt()


class Connection:
    """A master connection to one device running the agent (edgekit/deploy/agent.py); use as a
    context manager. :meth:`call` runs an agent operation (a line each way on the open
    connection); :meth:`run` and :meth:`rsync_shell` start commands multiplexed through it."""

    def __init__(self, host: HostSpec, options: SshOptions):
        self.host = host
        self.options = options
        self.remote_root: str | None = None
        self.interrupted = False
        self._dir: str | None = None
        self._master: subprocess.Popen | None = None
        self._returncode: int | None = None
        self._buffer = b""
        self._stderr: collections.deque[bytes] = collections.deque(maxlen=256)
        self._stderr_thread: threading.Thread | None = None

    @property
    def control_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "mux")

    def open(self) -> Connection:
        """Connect, authenticate, start the agent (it takes the device's deploy lock). Raises DeployError."""
        try:
            return self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Connection:
        # A short directory: a unix socket path is limited to ~100 bytes.
        clean_stale_control_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{CONTROL_PREFIX}{os.getpid()}-")
        root = self.host.root or "~/edgekit"
        agent = Path(__file__).with_name("agent.py").read_text() + "\nsys.exit(_serve(sys.argv[1]))\n"
        program = shlex.join([self.host.python or "python3", "-c", agent, root])
        argv = [*ssh_argv(self.host, self.options, control_path=self.control_path, master=True), self.host.destination, program]
        self._master = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Drain stderr as it comes (a full pipe would stall the device's side), keeping the end.
        self._stderr_thread = threading.Thread(target=self._drain_stderr, args=(self._master,), daemon=True)
        self._stderr_thread.start()
        with _open_lock:
            _open_connections.add(self)
        line = self._read_line(time.monotonic() + self.options.connect_timeout + 60)
        if line is None or not line.startswith("edgekit-ready "):
            stderr = self._stop_master()
            if line == "edgekit-busy":
                raise DeployError("another edgekit deploy holds this device's deploy lock", where=self.host.label,
                                  how=f"wait for it to finish (the lock is {root}/.lock, released when that deploy's "
                                      "connection ends)")
            if self._returncode in (126, 127):  # the device's shell: command not found / not executable
                raise DeployError(f"cannot run the Python interpreter {self.host.python or 'python3'!r} on the device: "
                                  f"{stderr.strip().splitlines()[-1] if stderr.strip() else 'not found'}", where=self.host.label,
                                  how="install python3 (3.10+) there, or pass --python with its path")
            raise classify_failure(stderr, self.host, self.options)
        self.remote_root = line.split(" ", 1)[1]
        return self

    def _drain_stderr(self, master: subprocess.Popen) -> None:
        assert master.stderr is not None
        for chunk in iter(lambda: master.stderr.read1(4096), b""):
            self._stderr.append(chunk)

    def _read_line(self, deadline: float) -> str | None:
        """The master's next line starting with edgekit- (a login banner may come before the
        first); None when it ended or the deadline passed."""
        assert self._master is not None and self._master.stdout is not None
        fd = self._master.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if line.startswith("edgekit-"):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(1.0, remaining))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk

    def call(self, op: str, payload: dict, *, timeout: float) -> dict:
        """Run the agent operation ``op`` on the device and return its result."""
        self.check_open(op)
        assert self._master is not None and self._master.stdin is not None
        try:
            self._master.stdin.write(json.dumps({"op": op, "payload": payload}).encode() + b"\n")
            self._master.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the connection is gone: reading says why
        line = self._read_line(time.monotonic() + timeout)
        if line is not None and line.startswith(AGENT_RESULT):
            return json.loads(line[len(AGENT_RESULT):])
        self.check_open(f"the end of {op}")
        ended = self._master.poll() is not None
        if not ended:
            self.interrupt()
        stderr = self._stop_master()
        if not ended:
            raise DeployError(f"{op} did not finish within {timeout:.0f} s", where=self.host.label,
                              how="check the device (load, disk) and retry")
        if self._returncode == 255:
            raise classify_failure(stderr, self.host, self.options, step=op)
        last = ([line for line in stderr.splitlines() if line.strip()] or ["no output"])[-1]
        raise DeployError(f"the device's agent ended during {op} (exit {self._returncode}): {last}", where=self.host.label,
                          how="check --python (edgekit needs Python 3.10 or newer there) and retry")

    def _stop_master(self) -> str:
        self._returncode = None
        if self._master is not None:
            try:
                self._master.stdin.close()  # the agent's stdin ends: it exits and the device's deploy lock goes
            except OSError:
                pass
            try:
                self._master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
            self._master.stdout.close()
            self._returncode = self._master.returncode
            self._master = None
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=5)
            self._stderr_thread = None
        return b"".join(self._stderr).decode(errors="replace")

    def interrupt(self) -> None:
        self.interrupted = True
        master = self._master
        if master is not None and master.poll() is None:
            master.kill()

    def check_open(self, step: str) -> None:
        """Refuse to go on after an interrupt (ssh would otherwise connect anew, without the master)."""
        if self.interrupted:
            raise DeployError(f"interrupted before {step}", where=self.host.label, how="run the deploy again: it resumes")

    def close(self) -> None:
        with _open_lock:
            _open_connections.discard(self)
        self._stop_master()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Connection:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands multiplexed through the master --------------------------------------------

    def ssh_command(self) -> list[str]:
        return ssh_argv(self.host, self.options, control_path=self.control_path)

    def rsync_shell(self) -> str:
        """The ``-e`` value for rsync: this connection's ssh, quoted for rsync's own word splitting."""
        return shlex.join(self.ssh_command())

    def run(self, remote_argv: list[str], *, timeout: float, step: str) -> subprocess.CompletedProcess:
        """Run ``remote_argv`` (quoted for the device's POSIX shell) and capture its output.

        ssh's own failures (exit 255 with no output from the remote program) raise DeployError;
        the remote program's exit status is the caller's to judge."""
        self.check_open(step)
        argv = [*self.ssh_command(), self.host.destination, shlex.join(remote_argv)]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeployError(f"{step} did not finish within {timeout:.0f} s", where=self.host.label,
                              how="check the device (load, disk) and retry") from None
        self.check_open(f"the end of {step}")
        if proc.returncode == 255 and not proc.stdout:
            raise classify_failure(proc.stderr.decode(errors="replace"), self.host, self.options, step=step)
        return proc


def terminate(proc: subprocess.Popen) -> None:
    """Stop a child we started (rsync) and wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
