"""Is this the same base model? :func:`fingerprint`: two cheap, deterministic hashes of a loaded (or
meta) model, one of its architecture and one of a few of its weights, that an adapter records and
the library checks against (core.library.check_adapter). torch is imported when a model is hashed,
not when this module is.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

_CONTENT_MAX = 2**24  # elements; a tensor hashed in full must stay cheap (64 MiB in fp32)


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the base model's parameters in model order, LoRA matrices left out and
    LoRALinear's ``.base_layer`` taken out of names, each shared tensor once."""
    out = []
    for name, p in model.named_parameters(remove_duplicate=True):
        if ".lora_A." in name or ".lora_B." in name:
            continue
        out.append((name.replace(".base_layer.", "."), p))
    return out


def _quantized_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Base-parameter name (as :func:`_base_parameters` spells it) → its bitsandbytes layer, for the
    weights stored packed in 4 or 8 bits."""
    from core import quant

    out = {}
    for name, m in model.named_modules():
        if quant.is_quantized_layer(m):
            out[(name + ".").replace(".base_layer.", ".") + "weight"] = m
    return out


def _as_unquantized(name: str, p: torch.Tensor, packed: dict[str, nn.Module]) -> tuple[list[int], Callable]:
    """A base parameter's shape and (lazily) values as the unquantised model holds them: a packed
    weight's logical shape and dequantised values, a Conv1D's transposed back."""
    from core import quant

    module = packed.get(name)
    if module is None:
        return list(p.shape), lambda: p.detach()
    flip = quant.stored_transposed(module)
    shape = list(quant.logical_shape(p))
    if flip:
        shape.reverse()

    def values():
        import torch

        w = quant.dequantized_weight(module, torch.float32)
        return w.t() if flip else w

    return shape, values


def _unmerged_views(model: nn.Module, packed: dict[str, nn.Module]) -> dict[str, tuple[list[int], Callable]]:
    """Base-parameter name → (shape, values) of each LoRA layer's weight as loaded, whatever is merged."""
    from core import lora

    out = {}
    for name, layer in lora.lora_layers(model):
        key = name + ".weight"
        if key in packed or not layer.merged:  # quantised layers never merge; unmerged: the weight itself
            continue
        out[key] = (list(layer.base_layer.weight.shape), lambda layer=layer: layer.base_weight())
    return out


def fingerprint(model: nn.Module) -> dict:
    """Is this the same base model? Two cheap, deterministic hashes.

    * ``shapes``: sha256 of the sorted ``(name, shape)`` list: the architecture;
    * ``content``: sha256 of the values of three fixed parameters (the first, middle and last of those
      with at most 2^24 elements, in model order), each rounded to bf16 and hashed as fp32 bytes on the
      CPU. Rounding to bf16 first makes an fp32 load and a bf16 load of one checkpoint agree (an fp16
      load of an fp32 checkpoint may round some values differently; the check only warns).
      ``None`` for a model on the meta device.
    A base quantised with bitsandbytes (core.quant) has the unquantised model's shapes (a packed
    weight counts with its logical shape), so an adapter trained on a 4-bit base fits the full one;
    its content hashes the dequantised values, which differ from the full model's (the check warns).
    Adapters injected with core.lora do not change either hash, merged or not: a LoRA layer's weight
    is hashed as loaded (``LoRALinear.base_weight``: W0 itself for bf16/fp16; for fp32, W − Σ merged ΔW,
    exact to fp32 rounding only, which is why a long-lived model is checked by its
    ``LoadedModel.fingerprint``, taken at load).
    ``tensors`` names the hashed ones and ``dtype`` and ``parameters`` are informational.
    """
    import torch

    from core import quant

    params = _base_parameters(model)
    packed = _quantized_weights(model)
    views = {n: _as_unquantized(n, p, packed) for n, p in params}
    views.update(_unmerged_views(model, packed))
    shapes = sorted((n, views[n][0]) for n, _ in params)
    shape_hash = hashlib.sha256(json.dumps(shapes, separators=(",", ":")).encode()).hexdigest()
    numel = {n: math.prod(views[n][0]) for n, _ in params}
    candidates = [(n, p) for n, p in params if numel[n] <= _CONTENT_MAX]
    chosen = []
    if candidates:
        for i in (0, len(candidates) // 2, len(candidates) - 1):
            if candidates[i] not in chosen:
                chosen.append(candidates[i])
    content = None
    if chosen and not any(p.is_meta for _, p in chosen):
        h = hashlib.sha256()
        for name, _ in chosen:
            shape, values = views[name]
            flat = values().to("cpu", torch.bfloat16).to(torch.float32).contiguous()
            h.update(name.encode())
            h.update(json.dumps(shape).encode())
            h.update(flat.numpy().tobytes())
        content = h.hexdigest()
    dtypes = {quant.layer_method(packed[n]) if n in packed else str(p.dtype).replace("torch.", "")
              for n, p in params}
    return {"shapes": shape_hash, "content": content, "tensors": [n for n, _ in chosen],
            "dtype": ",".join(sorted(dtypes)), "parameters": sum(numel.values())}
