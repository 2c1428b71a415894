"""The CUDA device this machine builds or runs engines on: what the builder writes into an
engine record and what loading one checks it against."""

from __future__ import annotations

import subprocess

from edgekit.errors import EngineError


def cuda_device() -> tuple[str | None, str]:
    """(name, "major.minor") of CUDA device 0; raises EngineError without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:
        pass
    try:  # a device without a CUDA-enabled torch (JetPack 6's nvidia-smi knows compute_cap)
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        name, cc = [p.strip() for p in out.splitlines()[0].split(",")]
        return name, cc
    except Exception:
        raise EngineError("no CUDA GPU found", where="this machine",
                          how="build the engine on the device (bundle's build_engine.sh) or on a machine with the target's GPU") from None
