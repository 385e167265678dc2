"""Which modules of a model can carry LoRA, and which ones a selection picks.

:func:`list_targets` names every adaptable module (Linear or Conv1D) with its block, its role in the
block (attention q/k/v/o, MLP gate/up/down, ...), its shape and its parameter count; this is what the
window's layer tree shows. :func:`resolve_targets` turns a selection (a preset, name suffixes or a
regular expression) into qualified names, and :func:`budget` gives the exact trainable parameter
count, r·(d_in + d_out) per matrix, before anything is injected. All of it works on a model built on
the ``meta`` device, so the layer tree and the counts come without loading weights.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from torch import nn

from core.config import PRESETS
from core.errors import StudioError
from core.lora import LoRALinear, is_adaptable, layer_shape

# The last name component of a module → its role. Covers the Llama/Mistral/Qwen/Gemma families
# (q_proj ... down_proj), Phi-3 (qkv_proj, gate_up_proj), Phi (dense, fc1/fc2), GPT-2 (c_attn,
# c_proj, c_fc), GPT-NeoX/Falcon/Bloom (query_key_value, dense_h_to_4h, dense_4h_to_h), OPT/BART
# (out_proj, fc1, fc2), GPT-J/NeoX (fc_in, fc_out), MPT (Wqkv, up_proj/down_proj).
ATTENTION_ROLES = {
    "q_proj": "q", "query": "q", "q": "q",
    "k_proj": "k", "key": "k", "k": "k",
    "v_proj": "v", "value": "v", "v": "v",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "Wqkv": "qkv", "qkv": "qkv",
    "o_proj": "o", "out_proj": "o", "dense": "o", "c_proj": "o", "o": "o", "wo": "o",
}
MLP_ROLES = {
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "c_fc": "up", "fc1": "up", "fc_in": "up", "dense_h_to_4h": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "w2": "down", "c_proj": "down", "fc2": "down", "fc_out": "down",
    "dense_4h_to_h": "down",
}
ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "feed_forward", "ffn", "ff")
# The preset "attention-qv" adapts W_q and W_v (the paper's default, section 7.1). Where q, k and v
# share one fused matrix (GPT-2's c_attn, NeoX's query_key_value), that matrix is the closest match.
PRESET_ROLES = {
    "attention-qv": {("attention", "q"), ("attention", "v"), ("attention", "qkv")},
    "attention": {("attention", r) for r in ("q", "k", "v", "qkv", "o")},
    "mlp": {("mlp", r) for r in ("gate", "up", "down", "gate_up")},
}
REGEX_CHARS = set("^$*+?[](){}|\\")


@dataclass
class TargetModule:
    """One adaptable module."""

    name: str
    """Qualified name, e.g. ``model.layers.3.self_attn.q_proj``."""
    block: str
    """The repeated block it sits in (``model.layers.3``), or ``""`` outside the blocks."""
    group: str
    """``attention``, ``mlp`` or ``other``."""
    role: str
    """``q``, ``k``, ``v``, ``qkv``, ``o``, ``gate``, ``up``, ``gate_up``, ``down``, ``head`` or ``linear``."""
    kind: str
    """``Linear`` or ``Conv1D``."""
    d_in: int
    d_out: int
    params: int
    """Parameters of the frozen module (weight and bias)."""
    is_head: bool
    """The output head (left out of ``all-linear``)."""

    def lora_params(self, rank: int) -> int:
        """Trainable parameters of a rank-``rank`` adapter on this module: r·(d_in + d_out)."""
        return rank * (self.d_in + self.d_out)

    def to_dict(self) -> dict:
        return asdict(self)


_BLOCK_RE = re.compile(r"^(.*?\.\d+)\.")


def _output_head_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # some architectures raise NotImplementedError
            head = None
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if (head is not None and base is head) or name.split(".")[-1] in ("lm_head", "embed_out", "score"):
            names.add(name)
    return names


def _classify(name: str) -> tuple[str, str]:
    parts = name.split(".")
    leaf = parts[-1]
    parents = [p.lower() for p in parts[:-1]]
    in_attn = any(any(w in p for w in ATTENTION_WORDS) for p in parents)
    in_mlp = any(p in MLP_WORDS or p.startswith("mlp") or "feed_forward" in p for p in parents)
    if in_attn and leaf in ATTENTION_ROLES:
        return "attention", ATTENTION_ROLES[leaf]
    if in_mlp and leaf in MLP_ROLES:
        return "mlp", MLP_ROLES[leaf]
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value"):
        return "attention", ATTENTION_ROLES[leaf]
    if leaf in ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2"):
        return "mlp", MLP_ROLES[leaf]
    return "other", "linear"


def list_targets(model: nn.Module) -> list[TargetModule]:
    """Every module of ``model`` that LoRA can adapt, in model order (LoRA-wrapped ones included)."""
    heads = _output_head_names(model)
    out: list[TargetModule] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            base = module.base_layer
        elif is_adaptable(module):
            if name.endswith(".base_layer"):
                continue
            base = module
        else:
            continue
        d_out, d_in = layer_shape(base)
        params = d_in * d_out + (base.bias.numel() if getattr(base, "bias", None) is not None else 0)
        m = _BLOCK_RE.match(name)
        block = m.group(1) if m else ""
        is_head = name in heads
        group, role = ("other", "head") if is_head else _classify(name)
        out.append(TargetModule(name=name, block=block, group=group, role=role,
                                kind="Linear" if isinstance(base, nn.Linear) else "Conv1D",
                                d_in=d_in, d_out=d_out, params=params, is_head=is_head))
    return out


def group_by_block(targets: Sequence[TargetModule]) -> dict[str, dict[str, list[TargetModule]]]:
    """``{block: {group: [modules]}}`` in model order; modules outside blocks sit under ``""``."""
    tree: dict[str, dict[str, list[TargetModule]]] = {}
    for t in targets:
        tree.setdefault(t.block, {}).setdefault(t.group, []).append(t)
    return tree


def _suffixes(targets: Sequence[TargetModule]) -> list[str]:
    seen: list[str] = []
    for t in targets:
        leaf = t.name.split(".")[-1]
        if leaf not in seen:
            seen.append(leaf)
    return seen


def describe_spec(spec: str | Sequence[str]) -> tuple[str, object]:
    """Classify a selection: ``("preset", name)``, ``("regex", pattern)`` or ``("names", [..])``."""
    if isinstance(spec, str):
        s = spec.strip()
        if s in PRESETS:
            return "preset", s
        if s.startswith("re:"):
            return "regex", s[3:]
        if any(c in REGEX_CHARS for c in s):
            return "regex", s
        return "names", [p.strip() for p in s.split(",") if p.strip()]
    return "names", [str(p).strip() for p in spec if str(p).strip()]


def resolve_targets(model_or_targets: nn.Module | Sequence[TargetModule],
                    spec: str | Sequence[str]) -> list[str]:
    """Qualified names selected by ``spec`` (preset, suffixes/full names, or regex), in model order.

    A selection that matches nothing raises a :class:`StudioError` listing the names that exist.
    """
    targets = list_targets(model_or_targets) if isinstance(model_or_targets, nn.Module) else list(model_or_targets)
    kind, value = describe_spec(spec)
    shown = f"'{spec}'" if isinstance(spec, str) else f"'{','.join(spec)}'"
    if kind == "preset":
        if value == "all-linear":
            chosen = [t.name for t in targets if not t.is_head]
        else:
            roles = PRESET_ROLES[value]  # type: ignore[index]
            chosen = [t.name for t in targets if (t.group, t.role) in roles]
    elif kind == "regex":
        try:
            rx = re.compile(value)  # type: ignore[arg-type]
        except re.error as e:
            raise StudioError(f"--targets {shown}: not a valid regular expression ({e})") from None
        chosen = [t.name for t in targets if rx.fullmatch(t.name) or rx.search(t.name)]
    else:
        names = value  # type: ignore[assignment]
        chosen = [t.name for t in targets
                  if any(t.name == n or t.name.endswith("." + n) for n in names)]  # type: ignore[union-attr]
    if not chosen and kind == "preset" and value == "mlp" and isinstance(model_or_targets, nn.Module):
        experts = next((type(m).__name__ for m in model_or_targets.modules() if type(m).__name__.endswith("Experts")), None)
        if experts:
            raise StudioError(f"--targets mlp: this model's MLP is a mixture of experts ({experts} holds them as "
                              "fused 3-D weights, not linear layers), which LoRA Studio cannot adapt",
                              hint="adapt its attention (--targets attention or all-linear)")
    if not chosen:
        example = next((t.name for t in targets if t.block), targets[0].name if targets else "")
        raise StudioError(
            f"--targets {shown} matches no module of this model; its adaptable modules are named "
            f"{', '.join(_suffixes(targets))} (for example '{example}'); use a preset "
            f"({', '.join(PRESETS)}), name suffixes, or a regular expression"
        )
    return chosen


@dataclass
class Budget:
    """What an adapter will cost, known before it is injected."""

    modules: int
    trainable: int
    """Exactly Σ r·(d_in + d_out) over the selected modules."""
    total: int
    """Parameters of the base model."""
    share: float
    """trainable / total."""
    adapter_bytes: int
    """Size of ``adapter_model.safetensors`` in fp32 (tensors only, header excluded)."""


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` without LoRA matrices, each shared tensor counted once (tied heads)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if ".lora_A." in name or ".lora_B." in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def budget(model: nn.Module, names: Iterable[str], rank: int) -> Budget:
    targets = {t.name: t for t in list_targets(model)}
    chosen = [targets[n] for n in names]
    trainable = sum(t.lora_params(rank) for t in chosen)
    total = count_parameters(model)
    return Budget(modules=len(chosen), trainable=trainable, total=total,
                  share=trainable / total if total else 0.0, adapter_bytes=trainable * 4)
