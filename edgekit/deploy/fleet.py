"""Deploy to many devices in parallel; one failing host does not stop the others.

Each host runs :func:`edgekit.deploy.deploy.deploy_host` in a thread (``--jobs`` at a time;
the work is ssh and rsync subprocesses). Progress goes to stderr (a bar per host on a
terminal, a line per step elsewhere); the per-host table is :func:`result_table`.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edgekit.deploy.deploy import DeployOptions, Events, HostResult, RuntimeSource, deploy_host, load_bundle, rollback_host
from edgekit.deploy.hosts import HostSpec, parse_host, read_hosts_file
from edgekit.deploy.ssh import interrupt_all
from edgekit.errors import DeployError


def resolve_hosts(hosts: tuple[str, ...] | list[str], hosts_file: str | None, options: DeployOptions) -> list[HostSpec]:
    """``--host`` values and ``--hosts FILE`` entries, with the command line's defaults filled in."""
    specs = [parse_host(text, where=f"--host {text}") for text in hosts]
    if hosts_file:
        specs += read_hosts_file(hosts_file)
    if not specs:
        raise DeployError("no device given", where="edgekit deploy", how="pass --host USER@HOST (repeatable) or --hosts FILE")
    labels: set[str] = set()
    for spec in specs:
        if spec.label in labels:
            raise DeployError(f"{spec.label} is given twice", where="--host/--hosts", how="list each device once")
        labels.add(spec.label)
    return [spec.with_defaults(port=options.port, identity=options.identity, python=options.python, root=options.remote_root)
            for spec in specs]


class RichEvents(Events):
    """A progress bar per host on a terminal; one line per step otherwise (CI logs)."""

    def __init__(self, console: Any, hosts: list[HostSpec]):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.console = console
        self.live = console.is_terminal
        self._lock = threading.Lock()
        self._progress = Progress(TextColumn("{task.fields[host]}"), TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(), console=console, transient=False)
        self._tasks = {h.label: self._progress.add_task("waiting", host=h.label, total=None) for h in hosts}

    def __enter__(self) -> RichEvents:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self._progress.stop()

    def status(self, host: str, text: str) -> None:
        if self.live:
            self._progress.update(self._tasks[host], description=text)
        else:
            with self._lock:
                self.console.print(f"{host}: {text}", highlight=False, markup=False, soft_wrap=True)

    def progress(self, host: str, done: int, total: int) -> None:
        if self.live:
            self._progress.update(self._tasks[host], completed=done, total=total)


class _Quiet(Events):
    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc) -> None:
        pass


def run_fleet(bundle: str | Path, hosts: list[HostSpec], options: DeployOptions, *, runtime: str | None = None,
              cache_dir: Path, jobs: int = 4, rollback: bool = False, console: Any = None) -> list[HostResult]:
    """Deploy (or roll back) on every host; results in the order the hosts were given."""
    if rollback:
        name = _bundle_name(bundle)
        work = lambda host, events: rollback_host(name, host, options, events)  # noqa: E731
    else:
        local = load_bundle(bundle)
        source = RuntimeSource(prebuilt=runtime, cache_dir=cache_dir)
        work = lambda host, events: deploy_host(local, host, options, source, events)  # noqa: E731
    events = RichEvents(console, hosts) if console is not None else _Quiet()
    with events, ThreadPoolExecutor(max_workers=max(1, min(jobs, len(hosts))), thread_name_prefix="deploy") as pool:
        futures = [pool.submit(work, host, events) for host in hosts]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            # Ctrl-C reaches only this thread: end the connections so the workers stop now (an
            # upload keeps its partial files; current is untouched unless it was being switched).
            for future in futures:
                future.cancel()
            interrupt_all()
            raise


def _bundle_name(bundle: str | Path) -> str:
    """--rollback takes the bundle directory or just its name."""
    from edgekit.deploy.deploy import MANIFEST
    from edgekit.names import check_name, name_problem

    path = Path(bundle)
    if (path / MANIFEST).is_file():
        import json

        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except ValueError:
            manifest = None
        name = manifest.get("name") if isinstance(manifest, dict) else None
        return check_name(name, what="bundle name in manifest.json", where=str(path / MANIFEST), error_cls=DeployError)
    if name_problem(str(bundle)) is None and not path.exists():
        return str(bundle)
    if not path.exists():
        check_name(str(bundle), what="bundle name", where="--rollback", error_cls=DeployError)
    raise DeployError("--rollback needs a bundle directory or a bundle name", where=str(bundle),
                      how="pass the bundle directory you deployed, or its name (letters, digits, . _ -)")


def result_table(results: list[HostResult]) -> Any:
    from rich.table import Table

    table = Table(title="edgekit deploy", title_justify="left")
    for column in ("host", "status", "version", "sent", "seconds", "runtime", "validate", "notes"):
        table.add_column(column, overflow="fold")
    for r in results:
        runtime = r.runtime or ""
        if r.fastpath is False:
            runtime += " (NumPy fallback)"
        validate = r.validate["verdict"] if r.validate else ""
        notes = (r.error or "; ".join(r.warnings)).replace(f" ({r.host})", "")  # the host is the first column
        style = "red" if r.status == "failed" else None
        table.add_row(r.host, r.status, r.version or "", _size(r.bytes_sent) if r.status != "failed" or r.bytes_sent else "",
                      f"{r.seconds:.1f}", runtime, validate, notes, style=style)
    return table


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def exit_code(results: list[HostResult]) -> int:
    """0 when every host is deployed (and validated, when asked), else 1."""
    bad = any(r.status == "failed" or (r.validate and r.validate["verdict"] != "passed") for r in results)
    return 1 if bad else 0
