"""The wrapper registry: every Hugging Face submodule of Gemma4VisionModel gets its wrapper, by exact class."""

import pytest
import torch
import wrapper_support as ws
from torch import nn
from transformers.models.gemma4 import modeling_gemma4 as hf

from core.config import PTQConfig
from core.ptq import prepare
from core.wrappers import WRAPPERS, QuantContext, UnsupportedModuleError, wrap

# Submodules that compute no Circle tensor of their own: RoPE tables are precomputed constants, the
# activation is applied inside the MLP wrapper, a ModuleList only holds the layers, and a clippable
# linear's inner nn.Linear is the clippable wrapper's own projection.
UNWRAPPED = (hf.Gemma4VisionRotaryEmbedding, nn.ModuleList, type(hf.ACT2FN["gelu_pytorch_tanh"]))


def wrapped_hf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule that must have a wrapper, by its dotted name."""
    clippable = {name for name, m in model.named_modules() if type(m) is hf.Gemma4ClippableLinear}
    return {
        name: module
        for name, module in model.named_modules()
        if not isinstance(module, UNWRAPPED) and name.rpartition(".")[0] not in clippable
    }


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = ws.tiny_vision_model(use_clipped_linears=True)
    return model, prepare(model)


def test_every_hf_submodule_gets_the_wrapper_registered_for_its_class(models):
    model, qmodel = models
    wrappers = {name: w for name, w in qmodel.wrappers()}
    wrappers[""] = qmodel
    for name, module in wrapped_hf_modules(model).items():
        assert name in wrappers, f"{name} ({type(module).__name__}) has no wrapper"
        assert type(wrappers[name]) is WRAPPERS[type(module)], name
    # Every registered class occurs in the model, so each wrapper above was exercised.
    assert {type(m) for m in model.modules()} >= set(WRAPPERS)


def test_wrappers_are_named_after_the_module_they_replace_in_forward_order(models):
    model, qmodel = models
    assert sorted(n for n, _ in qmodel.wrappers()) == sorted(n for n in wrapped_hf_modules(model) if n)
    # Observers follow the data: embedder, encoder, pooler, then the root's standardization.
    tops = [o.module_name.split(".")[0] for o in qmodel.observers()]
    assert list(dict.fromkeys(tops)) == ["patch_embedder", "encoder", "pooler", ""]


def test_an_unknown_module_raises_an_error_naming_its_class_and_place():
    ctx = QuantContext(config=PTQConfig())
    with pytest.raises(UnsupportedModuleError, match=r"torch\.nn\.modules\.conv\.Conv2d at encoder\.stem"):
        wrap(nn.Conv2d(1, 1, 1), "encoder.stem", ctx)
    with pytest.raises(UnsupportedModuleError, match="<root>"):
        wrap(nn.GELU(), "", ctx)
    assert issubclass(UnsupportedModuleError, TypeError)


def test_a_subclass_is_not_silently_wrapped_as_its_parent():
    class PatchedLinear(nn.Linear):
        pass

    with pytest.raises(UnsupportedModuleError, match="PatchedLinear"):
        wrap(PatchedLinear(2, 2), "proj", QuantContext(config=PTQConfig()))
