"""Shape-only (Meta) kernels for torch's fake-quantize ops, so tracing never computes them.

``torch.fake_quantize_per_tensor_affine`` and ``..._per_channel_affine`` decompose into the
``*_cachemask`` ops, which torch 2.13 implements for CPU and CUDA but not for the Meta device.
``torch.export`` traces with fake tensors; for an op without a Meta kernel its FakeTensorMode
takes the "unsafe fallback": it fills a real zero tensor of each input's shape, runs the real
kernel on it and converts the result (output and mask) back to a fake tensor. On e2b at 280 soft
tokens one attention-score fake-quant is a 300 MB real tensor plus a 76 MB mask, made 4-5 times
per layer. Those copies sat in reference cycles until a full garbage collection, so whether
``torch.export`` peaked at 2.6 or 6.5 GiB depended on when Python's collector happened to run.

A Meta kernel only states the output's shape and dtype (the input's, and bool for the mask),
which is exactly what the real kernels return. ``register()`` adds them once, and only for ops
that still have no Meta kernel, so a later torch that ships its own keeps it.
"""

from __future__ import annotations

import torch

# Each returns (output like the input, bool mask like the input).
_CACHEMASK_OPS = (
    "fake_quantize_per_tensor_affine_cachemask",
    "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "fake_quantize_per_channel_affine_cachemask",
)

_library: torch.library.Library | None = None  # registrations live as long as this object
_registered: list[str] = []


def _output_and_mask(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def register() -> list[str]:
    """Add the missing Meta kernels (idempotent); returns the ops that have ours."""
    global _library
    if _library is not None:
        return list(_registered)
    _library = torch.library.Library("aten", "IMPL")
    for name in _CACHEMASK_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), "Meta"):  # noqa: SLF001 -- torch has no public query for a registered Meta kernel
            continue
        _library.impl(name, _output_and_mask, "Meta")
        _registered.append(name)
    return list(_registered)
