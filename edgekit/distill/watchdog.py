"""Stop a launched training process when the edgekit process that launched it is gone."""

from __future__ import annotations

import os
import threading
import time


class Watchdog:
    """In a launched worker: stop when the launcher (our parent) is gone, so a killed edgekit
    run leaves no orphan writing into the work dir. A no-op in the edgekit process."""

    def __init__(self) -> None:
        self.parent: int | None = None

    def start(self) -> None:
        self.parent = os.getppid()

        def watch() -> None:
            while True:
                time.sleep(0.5)
                self.check()

        threading.Thread(target=watch, daemon=True, name="edgekit-distill-watchdog").start()

    def check(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            os._exit(3)


watchdog = Watchdog()
