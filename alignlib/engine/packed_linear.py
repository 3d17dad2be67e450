"""Linear layers reordered once for oneDNN, so that a CPU decode loop multiplies small batches fast.

A decode step at batch 16 multiplies activations (16, D) by every weight matrix of the model once. Through
``F.linear`` (MKL's sgemm) those thin products run far below the machine's matmul peak: measured on the course's
2-core CPU (fp32, 2 threads), the 7 matrices of SmolLM2-135M's 30 layers take 93 ms per step and its LM head
27 ms; with each weight reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``)
and multiplied by ``torch.ops.mkldnn._linear_pointwise`` they take 40 ms and 7 ms. The reorder is done once per
``generate`` call, then used for every step. Products are the same up to float rounding (summation order).
Layers that read the same input (q, k, v; gate, up) are stacked into one matrix: fewer, wider products (27 ms
instead of 31 ms for the 30 layers, same measurement). The two ops are torch's own (inductor's CPU path uses them)
but private: where they are missing, ``packing_available`` is False and every module is called as it is.

LoRA: a peft ``lora.Linear`` is reordered with its adapter folded in, W + (alpha / r) B A (Hu et al. 2021, Eq. 3),
exactly what the module computes in eval mode (dropout off); ``disable_adapter()`` gives W alone. Layers this
module cannot fold (DoRA, merged adapters, other adapter types) are not packed: ``PackedLinears`` calls them as
they are. The cost: a second copy of the packed weights while decoding (+540 MB for SmolLM2-135M in fp32).
"""
from __future__ import annotations

import torch
from torch import nn


def packing_available(weight: torch.Tensor) -> bool:
    """oneDNN packing applies to fp32 weights on a CPU, in a torch built with oneDNN (MKL-DNN)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def effective_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias (out,) or None) that ``module`` applies in eval mode, or None if it is not a plain
    linear map this module knows how to fold (then it must be called as it is)."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(module, "lora_A") or getattr(module, "merged", True):
        return None
    if getattr(module, "disable_adapters", False):
        return base.weight, base.bias
    active = [a for a in module.active_adapters if a in module.lora_A]        # peft skips the others too
    variants, biased = getattr(module, "lora_variant", {}), getattr(module, "lora_bias", {})
    if any(a in variants or module.use_dora.get(a, False) or biased.get(a, False) for a in active):
        return None                                                             # DoRA & co: not a plain W + BA
    weight = base.weight
    for adapter in active:                                     # W + scaling * B @ A, as peft computes it
        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight, base.bias


class PackedLinears:
    """Groups of linear layers reading the same input, each group reordered once as one matrix for ``rows``-row
    inputs: ``linear(x, q_proj, k_proj, v_proj)`` -> (q, k, v) is one product (fewer, wider products are faster
    at small batch), ``linear(x, o_proj)`` -> o. Pass the groups to pack when building it.

    A group with a module that cannot be folded (see ``effective_weight``), and every group where packing is
    unavailable (a GPU, bf16, torch without oneDNN), is simply called: ``linear(x, m) == m(x)`` up to rounding.
    """

    def __init__(self, groups, rows: int):
        self.packed: dict[tuple, tuple] = {}
        with torch.no_grad():
            for group in groups:
                if not all(packing_available(next(module.parameters())) for module in group):
                    continue                                                  # checked before folding any LoRA
                found = [effective_weight(module) for module in group]
                if any(f is None for f in found):
                    continue
                weight = (torch.cat([w for w, _ in found]) if len(found) > 1 else found[0][0]).detach()  # (outs, in)
                bias = None
                if any(b is not None for _, b in found):                      # zeros for the unbiased members
                    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in found])
                self.packed[tuple(id(m) for m in group)] = (torch.ops.mkldnn._reorder_linear_weight(weight, rows),
                                                            None if bias is None else bias.detach(),
                                                            [w.shape[0] for w, _ in found])

    def __len__(self) -> int:
        return len(self.packed)

    def __call__(self, x: torch.Tensor, *modules: nn.Module):  # x (..., in) -> (..., out) for each module
        entry = self.packed.get(tuple(id(m) for m in modules))
        if entry is None:
            out = tuple(module(x) for module in modules)
        else:
            weight, bias, sizes = entry
            out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "").split(sizes, -1)
        return out[0] if len(modules) == 1 else out
