"""Where the model and the batches run: the device name a user gives, resolved against this torch."""

from __future__ import annotations

import torch

from core.errors import ConfigError

__all__ = ["DEVICES", "resolve_device", "batches_to_device", "device_unavailable"]

# The device choices a user is offered (the CLI's --device, the GUI's model panel).
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | None) -> str:
    """The torch device name for cpu, cuda[:N] or auto; a ConfigError for anything this torch cannot use."""
    d = (device or "cpu").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda: this torch build sees no CUDA device; use cpu")
    if d != "cpu" and not d.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or auto")
    return d


def device_unavailable(device: str) -> str | None:
    """Why this torch cannot run on `device` (one line for a tooltip), or None when it can."""
    if device == "cpu" or torch.cuda.is_available():
        return None
    if device == "auto":
        return "auto picks cuda when there is a GPU; this torch build sees none, so it would be cpu"
    return "this torch build sees no CUDA device (no GPU, no driver, or a CPU-only torch)"


def batches_to_device(batches, device: str):
    """Yield each preprocessed batch with its tensors on `device` (no copy on cpu)."""
    for b in batches:
        if device == "cpu":
            yield b
        else:
            yield {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
