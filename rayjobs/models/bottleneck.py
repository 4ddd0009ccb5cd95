"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), a small module of our own.

peft has no bottleneck adapters and AdapterHub's `adapters` pins transformers 4.x, so the adapter
is ~40 lines here: a down-projection, a non-linearity and a zero-initialised up-projection added
residually to the output of a sub-layer's output projection (identity at initialisation). Houlsby
places one after the attention output and one after the feed-forward output of every layer;
Pfeiffer only after the feed-forward output. The adapter is registered as a child of the projection
it follows and applied by a forward hook, so the pretrained parameter names do not change and a
checkpoint holds just `...adapter.{down,up}.{weight,bias}`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# output projections of (attention, feed-forward) sub-layers, by model_type
PLACEMENTS: dict[str, tuple[str, str]] = {
    "bert": (r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"),
    "roberta": (r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"),
    "t5": (r"(SelfAttention|EncDecAttention)\.o$", r"DenseReluDense\.wo$"),
    "gpt2": (r"attn\.c_proj$", r"mlp\.c_proj$"),
    "llama": (r"self_attn\.o_proj$", r"mlp\.down_proj$"),
    "mistral": (r"self_attn\.o_proj$", r"mlp\.down_proj$"),
}
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Adapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _apply_adapter(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)  # GPT-2's Conv1D stores (in, out)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])
    raise ValueError(f"cannot place an adapter after a {type(module).__name__}")


def add_adapters(model: nn.Module, model_type: str, style: str = "houlsby", reduction_factor: int = 16,
                 non_linearity: str | None = None, target_modules: list[str] | None = None) -> list[str]:
    """Insert adapters in place; returns the names of the projections they follow."""
    if style not in ("houlsby", "pfeiffer"):
        raise ValueError(f"adapter style must be houlsby or pfeiffer, got {style!r}")
    activation = non_linearity or ("swish" if style == "houlsby" else "relu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"adapter non_linearity must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if target_modules is None:
        if model_type not in PLACEMENTS:
            raise ValueError(f"no adapter placement known for model_type {model_type!r}; give "
                             f"`target_modules` (regexes of output projections), known: {sorted(PLACEMENTS)}")
        attn, ffn = PLACEMENTS[model_type]
        target_modules = [attn, ffn] if style == "houlsby" else [ffn]
    patterns = [re.compile(p) for p in target_modules]
    placed = []
    for name, mod in list(model.named_modules()):
        if name and any(p.search(name) for p in patterns):
            dim = _out_features(mod)
            ref = next(mod.parameters())
            mod.add_module("adapter", Adapter(dim, max(1, dim // reduction_factor), activation).to(ref.device,
                                                                                                 ref.dtype))
            mod.register_forward_hook(_apply_adapter)
            placed.append(name)
    if not placed:
        raise ValueError(f"no module of this {model_type} model matches adapter target_modules {target_modules}")
    return placed
