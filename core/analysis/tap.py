"""The one tap of the analysis, and the forward passes that compare, sensitivity, heatmaps and the
divergence locator share.

Tap: ``MethodTap`` shadows one method on chosen module instances while inside. Forward hooks cannot be
used: the static path (the one QUANT runs) calls ``forward_static`` of the patch embedder, encoder and
pooler directly, and every observed tensor goes through ``QuantModule.fq`` on both the float and the
quantized pass; an instance attribute shadows the class's method in both cases. ``FqTap`` taps ``fq``
(every tensor a wrapper fake-quantizes, or would); ``PairTap`` pairs what chosen observers see on the
float pass with what they see on the quantized pass; the locator taps each unit's entry method.

Forward passes: the FP reference is QUANT mode with every observer kept float (``fp_forward``), i.e. the
very graph the quantized pass (``quant_forward``) runs (same wrappers, same fq call sites, folded input
projection) without fake-quant. NO_QUANT would take HF's maths in places (the patch embedder's unfolded
projection) and skip wrappers the QUANT pass goes through, leaving them without an FP twin.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from core.cancel import CancelToken
from core.quant.mode import Mode

Progress = Callable[[int, int, str], None]

# Keep-float globs that keep every observer float: the FP reference.
ALL_FLOAT = ["*"]

__all__ = [
    "ALL_FLOAT",
    "Progress",
    "MethodTap",
    "FqTap",
    "PairTap",
    "module_output_observers",
    "wrapper_kind",
    "first_tensor",
    "final_output",
    "model_inputs",
    "model_device",
    "enter_quant",
    "fp_forward",
    "quant_forward",
    "single_image_batches",
]

_KIND_NAMES = {
    "QuantLinear": "linear",
    "QuantClippableLinear": "linear",
    "QuantRMSNorm": "rmsnorm",
    "QuantVisionMLP": "mlp",
    "QuantVisionAttention": "attention",
    "QuantVisionEncoderLayer": "layer",
    "QuantVisionEncoder": "encoder",
    "QuantPatchEmbedder": "patch_embedder",
    "QuantPooler": "pooler",
    "QuantVisionModel": "model",
}


# ---------------------------------------------------------------------------------------------
# Wrappers and their outputs
# ---------------------------------------------------------------------------------------------


def wrapper_kind(module) -> str:
    """Short kind of a wrapper ("linear", "rmsnorm", "layer", ...) from its class."""
    cls = type(module).__name__
    return _KIND_NAMES.get(cls, re.sub(r"^Quant", "", cls).lower() or cls)


def first_tensor(out) -> torch.Tensor | None:
    """The output tensor of a model call: a tensor, a ModelOutput or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    t = getattr(out, "last_hidden_state", None)
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(out, (tuple, list)):
        for t in out:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t
    return None


def final_output(out) -> torch.Tensor:
    """first_tensor, or a TypeError naming what the model returned instead."""
    t = first_tensor(out)
    if t is None:
        raise TypeError(f"model returned {type(out).__name__}, expected a tensor output")
    return t


def module_output_observers(qmodel) -> list[tuple[str, str, Any]]:
    """(wrapper name, kind, observer) for every wrapper, in forward order.

    A wrapper's output is the tensor its ``obs_output`` observer sees; wrappers without one
    (attention, MLP, encoder) end in a child wrapper (o_proj, down_proj, last layer) whose
    output observer sees exactly their output.
    """
    named = list(qmodel.wrappers())
    names = [n for n, _ in named]
    own = {n: getattr(m, "obs_output", None) for n, m in named}

    def resolve(name: str):
        if own.get(name) is not None:
            return own[name]
        pre = name + "."
        inner = [n for n in names if n.startswith(pre)]
        # The container's output is produced by its last outermost child (the last layer, not
        # that layer's last norm).
        outer = [n for n in inner if not any(n.startswith(o + ".") for o in inner if o != n)]
        return resolve(outer[-1]) if outer else None

    out = []
    for name, mod in named:
        obs = resolve(name)
        if obs is None:
            continue
        out.append((name, wrapper_kind(mod), obs))
    return out


# ---------------------------------------------------------------------------------------------
# The tap
# ---------------------------------------------------------------------------------------------


class MethodTap:
    """Shadows one method on chosen module instances while inside (see the module docstring).

    ``around(module, orig, *args, **kwargs)`` runs in place of ``module.<method>(*args, **kwargs)``,
    ``orig`` being the bound method it shadows. Subclasses name the (module, method) pairs in
    ``targets()``, read on entry.
    """

    def __init__(self, around: Callable[..., Any]):
        self.around = around
        self._patched: list[tuple[Any, str]] = []
        self._originals: dict[tuple[int, str], Callable[..., Any]] = {}

    def targets(self) -> Iterable[tuple[Any, str]]:
        """(module, method name) pairs to shadow."""
        raise NotImplementedError

    def original(self, module, method: str) -> Callable[..., Any]:
        """The bound method the tap shadows on `module` (to run it untapped while inside)."""
        return self._originals[(id(module), method)]

    def __enter__(self):
        try:
            for module, method in self.targets():
                if method in module.__dict__:
                    name = getattr(module, "module_name", type(module).__name__)
                    raise RuntimeError(f"{name}.{method} is already patched")
                orig = getattr(module, method)
                self._originals[(id(module), method)] = orig
                setattr(module, method, functools.partial(self.around, module, orig))
                self._patched.append((module, method))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for module, method in self._patched:
            module.__dict__.pop(method, None)
        self._patched.clear()
        self._originals.clear()


class FqTap(MethodTap):
    """Calls ``hook(observer, output)`` for every tensor a wrapper fake-quantizes (or would).

    Every observed tensor goes through ``QuantModule.fq``, so that is where it is tapped. A module whose
    ``fq`` is already shadowed (another tap in place) is left to that tap.
    """

    def __init__(self, qmodel, hook: Callable[[Any, torch.Tensor], None]):
        super().__init__(self._around_fq)
        self.qmodel = qmodel
        self.hook = hook

    def targets(self) -> list[tuple[Any, str]]:
        """``fq`` of every quant module not tapped already."""
        return [(mod, "fq") for mod in self.qmodel.quant_modules() if "fq" not in mod.__dict__]

    def _around_fq(self, module, orig, x, obs):
        y = orig(x, obs)
        self.hook(obs, y)
        return y


class PairTap(FqTap):
    """Pairs the tensors chosen observers see on the float and the quantized pass.

    Phase "fp": the wanted observers' tensors are kept, in call order; phase "q": each one is paired
    with its float twin (same observer, same call number) as soon as it is produced, handed to
    ``on_pair(observer, fp, q)`` and released; "off" drops what is left. ``cancel`` is checked at
    every wanted tensor, so a long single-image pass stops early.
    """

    def __init__(
        self,
        qmodel,
        wanted: Collection[str],
        on_pair: Callable[[Any, torch.Tensor, torch.Tensor], None],
        cancel: CancelToken | None = None,
        what: str | None = None,
    ):
        super().__init__(qmodel, self._on_fq)
        self.wanted = wanted
        self.on_pair = on_pair
        self.cancel = cancel
        self.what = what  # names the step in the cancel message
        self.phase = "off"
        self.store: dict[tuple[str, int], torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.store.clear()

    def start(self, phase: str) -> None:
        """Enter "fp" (keep), "q" (pair) or "off" (drop the float tensors left unpaired)."""
        self.phase = phase
        self.calls = {}
        if phase == "off":
            self.store.clear()

    def run(self, inputs: Mapping, keep: Sequence[str], after_fp: Callable[[], None] | None = None):
        """One float and one quantized pass (modules matching `keep` kept float), paired; their final outputs."""
        self.start("fp")
        fp_out = fp_forward(self.qmodel, inputs)
        if after_fp is not None:
            after_fp()
        self.start("q")
        q_out = quant_forward(self.qmodel, inputs, keep)
        self.start("off")
        return fp_out, q_out

    def _on_fq(self, obs, y: torch.Tensor) -> None:
        if self.phase == "off":
            return
        name = obs.name
        if name not in self.wanted:
            return
        if self.cancel is not None:
            self.cancel.raise_if_cancelled(self.what)
        i = self.calls.get(name, 0)
        self.calls[name] = i + 1
        if self.phase == "fp":
            self.store[(name, i)] = y.detach()
            return
        fp = self.store.pop((name, i), None)
        if fp is not None and fp.shape == y.shape:
            self.on_pair(obs, fp, y.detach())


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


def model_inputs(batch: Mapping, device) -> tuple[dict, list[str]]:
    """The model's keyword inputs of a preprocessor batch on `device`, and the batch's image ids."""
    ids = list(batch.get("image_ids") or [])
    inputs = {
        "pixel_values": batch["pixel_values"].to(device),
        "pixel_position_ids": batch["pixel_position_ids"].to(device),
    }
    return inputs, ids


def model_device(qmodel) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    for p in qmodel.parameters():
        return p.device
    return torch.device("cpu")


def enter_quant(qmodel) -> None:
    """Put the model in QUANT mode (freezes qparams; NotCalibratedError without statistics)."""
    if qmodel.ctx.mode is not Mode.QUANT:
        qmodel.set_mode(Mode.QUANT)


def fp_forward(qmodel, inputs) -> torch.Tensor:
    """The FP reference output: the QUANT graph with every observer kept float (module docstring)."""
    qmodel.set_keep_float(ALL_FLOAT)
    return final_output(qmodel(**inputs, static=True)).detach()


def quant_forward(qmodel, inputs, keep: Sequence[str]) -> torch.Tensor:
    """The quantized output with the modules matching `keep` kept float."""
    qmodel.set_keep_float(list(keep))
    return final_output(qmodel(**inputs, static=True)).detach()


def single_image_batches(batches: Iterable[Mapping]) -> Iterator[Mapping]:
    """Split every batch into batches of one image (memory stays bounded by one image)."""
    for batch in batches:
        pv = batch["pixel_values"]
        n = int(pv.shape[0])
        if n == 1:
            yield batch
            continue
        per_image = ("image_ids", "paths")  # lists with one entry per image
        for b in range(n):
            one = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_position_ids", *per_image)}
            one["pixel_values"] = pv[b : b + 1]
            one["pixel_position_ids"] = batch["pixel_position_ids"][b : b + 1]
            for key in per_image:
                values = list(batch.get(key) or [])
                if values or key == "image_ids":
                    one[key] = [values[b]] if b < len(values) else []
            yield one
