"""Device choice: CUDA when present, else CPU; nothing in the suite assumes a GPU."""
from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


class DeviceError(ValueError):
    """An unknown device, or one this machine does not have; the message names it."""


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`; anything else is a DeviceError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise DeviceError(f"--device '{name}': unknown device (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device '{name}': CUDA is not available on this machine (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device '{name}': MPS is not available on this machine (use auto or cpu)")
    return dev
