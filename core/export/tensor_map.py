"""Which of our modules made each tensor of an exported Circle file (``ExportResult.tensor_modules``).

TICO names a tensor made from an FX node ``<module class>::<node name>``; while converting, the
exporter records (``TensorOrigins``, fed by core.export.runtime's name hook) each tensor's FX node and
that node's ``nn_module_stack``, and ``tensor_module_map`` translates the innermost module path (e.g.
``qmodel.encoder.layers.0.self_attn.q_proj``) into our wrapper name
(``encoder.layers.0.self_attn.q_proj``). core.analysis.threeway pairs tensors with modules by it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch

from core.wrappers.base import QuantModule

__all__ = ["ROOT_MODULE", "TensorOrigins", "module_paths", "module_scopes", "tensor_module_map"]

# Module name given to ops of the wrapped model's own forward (standardisation), of the export
# adapter, and to the graph input: they belong to no submodule.
ROOT_MODULE = "model"


class TensorOrigins(dict):
    """{tensor name (or "::<FX node name>"): its FX node's nn_module_stack paths, None without a node}."""

    def record(self, name: str, node: Any) -> None:
        """The name hook of core.export.runtime.convert_to_circle: remember where `name` came from."""
        self[name] = _node_module_path(node) if node is not None else None


@contextlib.contextmanager
def module_scopes(qmodel: Any) -> Iterator[None]:
    """Route the static-path entry points that the parent calls as plain methods
    (``patch_embedder.forward_static``, ``encoder.run_layers``, ``pooler.forward_static``) through
    ``nn.Module.__call__`` while tracing, so torch.export records the submodule in each node's
    ``nn_module_stack``. The graph is unchanged: only the recorded scope differs."""
    patched: list[tuple[Any, str]] = []
    try:
        for wrapper in qmodel.quant_modules():
            if wrapper is qmodel:
                continue
            for method in ("forward_static", "run_layers"):
                if method in wrapper.__dict__ or not callable(getattr(type(wrapper), method, None)):
                    continue
                wrapper.__dict__[method] = _scoped_call(wrapper, getattr(wrapper, method))
                patched.append((wrapper, method))
        yield
    finally:
        for wrapper, method in patched:
            wrapper.__dict__.pop(method, None)


def _scoped_call(wrapper: torch.nn.Module, method: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        if "forward" in wrapper.__dict__:  # already inside this module's scope (re-entrant call)
            return method(*args, **kwargs)
        # An instance attribute `forward` shadows the class's for this one call only.
        wrapper.__dict__["forward"] = method
        try:
            return wrapper(*args, **kwargs)
        finally:
            wrapper.__dict__.pop("forward", None)

    return call


def module_paths(module: torch.nn.Module) -> dict[str, str]:
    """Every attribute path in the export module -> our name of the innermost wrapper holding it."""
    paths: dict[str, str] = {}
    for path, sub in module.named_modules():  # parents come before their children
        if isinstance(sub, QuantModule):
            paths[path] = sub.module_name or ROOT_MODULE
        else:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            paths[path] = paths.get(parent, ROOT_MODULE) if path else ROOT_MODULE
    return paths


def _node_module_path(node: Any) -> tuple[str, ...] | None:
    """The module paths of an FX node's ``nn_module_stack``, outermost first ("" = the export module)."""
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    if not stack:
        return None
    return tuple(str(entry[0]) for entry in stack.values() if isinstance(entry, (tuple, list)) and entry)


def _our_module(stack: tuple[str, ...] | None, scopes: Mapping[str, str]) -> str | None:
    """An ``nn_module_stack`` -> the innermost wrapper's module name (ROOT_MODULE for the root).

    Entries are absolute attribute paths, except below a module entered through a plain method
    (see module_scopes), where torch records them relative to that module: each entry is taken
    as it is when the export module has that path, else relative to the nearest enclosing entry.
    """
    if stack is None:
        return None
    resolved: list[str] = []
    for entry in stack:
        if not entry and resolved:  # only the outermost entry may be the export module itself
            continue
        for base in [None, *reversed(resolved)]:
            path = entry if base is None else (f"{base}.{entry}" if base and entry else base or entry)
            if path in scopes:
                resolved.append(path)
                break
    return scopes.get(resolved[-1], ROOT_MODULE) if resolved else ROOT_MODULE


def tensor_module_map(data: bytes, origins: Mapping[str, tuple[str, ...] | None], scopes: Mapping[str, str]) -> dict[str, str]:
    """Circle tensor name -> our module name, for every tensor of the file.

    A tensor made from an FX node takes the innermost module of that node's ``nn_module_stack``
    (TICO names such tensors ``<module class>::<node name>``). A tensor without a node (a constant
    the serializer created) takes the module of the first operator that reads it; one nobody
    reads, that of its producer; the graph input belongs to ROOT_MODULE.
    """
    from tico.circle.runtime.program import CircleProgram  # noqa: PLC0415 -- tico.circle.* costs ~0.6 s at import (measured); only export and its checks run it

    program = CircleProgram.from_bytes(data)
    modules: dict[int, str] = {}
    for t in program.tensors:
        if t.name in origins:
            path = origins[t.name]
        else:  # no serializer hook: the FX node name follows "::"
            path = origins.get("::" + t.name.rsplit("::", 1)[-1]) if "::" in t.name else None
        name = _our_module(path, scopes)
        if name is not None:
            modules[t.index] = name
    for index in program.inputs:
        modules.setdefault(index, ROOT_MODULE)
    for op in program.operators:  # constants without a node: their first reader
        owner = next((modules[o] for o in op.outputs if o in modules), None)
        if owner is None:
            continue
        for index in op.inputs:
            if index >= 0:
                modules.setdefault(index, owner)
    for op in program.operators:  # outputs of an op with no known scope: the module of its inputs
        owner = next((modules[i] for i in op.inputs if i >= 0 and i in modules), ROOT_MODULE)
        for index in op.outputs:
            modules.setdefault(index, owner)
    return {t.name: modules.get(t.index, ROOT_MODULE) for t in program.tensors}
