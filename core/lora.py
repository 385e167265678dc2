"""The LoRA layer, merging, and putting adapters into a model (Hu et al., arXiv:2106.09685).

A :class:`LoRALinear` wraps a frozen ``nn.Linear`` (or transformers' ``Conv1D``, whose weight is
stored transposed) by composition, as litgpt and torchtune do. It may hold several named adapters;
each is a pair ``A`` (r × d_in) and ``B`` (d_out × r) with a scaling s, and the layer computes

    y = W0·x + b + Σ_active s · B·A·dropout(x)          (eq. 3 of the paper, with dropout on x)

Because ``B`` starts at zero, a freshly injected model computes exactly the base model, bit for bit.
``merge`` folds ``s·B·A`` into ``W0`` in place (in fp32, refusing non-finite results), ``unmerge``
takes it out again; neither happens as a side effect of ``.eval()``.

Injection is plain functions over qualified module names (PEFT's ``_replace_module`` shape):
:func:`inject_adapter`, :func:`remove_adapter`, :func:`set_active_adapters`, :func:`merge_adapter`,
:func:`unmerge_adapter`, :func:`swap_adapter`, :func:`unload`.

The fast path of the forward and backward (hand-written autograd functions, and one node for
sibling layers fed the same input) is in :mod:`core.lora_autograd`; a layer here decides when a
call can take it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import StudioError
from core.lora_autograd import _GroupFunction  # noqa: F401  (tests count its calls through core.lora)
from core.lora_autograd import _LoRAAddFunction, _LoRAFunction, _SharedInput, _autocast_dtype

try:  # transformers' GPT-2 style layer: y = x @ W + b with W of shape (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, but core/lora stays usable
    Conv1D = ()  # type: ignore[assignment]

SUPPORTED_TYPES = "torch.nn.Linear and transformers' Conv1D"


def is_adaptable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type LoRALinear can wrap."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (checked without importing
    bitsandbytes). Such layers subclass nn.Linear, but their weight is packed: LoRA wraps them, the
    base output and its gradient are computed by bitsandbytes, and nothing is merged into them."""
    return type(module).__module__.startswith("bitsandbytes.")


def quant_name(module: nn.Module) -> str:
    """``nf4``, ``fp4`` or ``int8`` for a bitsandbytes layer (its weight's quant type)."""
    qs = getattr(module.weight, "quant_type", None)
    return str(qs) if qs else "int8"


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D, whichever way its weight is stored."""
    if isinstance(module, LoRALinear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if Conv1D and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in
    raise StudioError(f"{type(module).__name__} cannot carry a LoRA adapter; supported: {SUPPORTED_TYPES}")


# Layers that read the same input inside one block (q/k/v, gate/up) are run as one group: the first
# of them to be called computes every member's output in one autograd node, the others take theirs.
# Grouping is by name (same parent module, same in_features); that they really get the same tensor
# is checked at run time, call by call (see _SharedInput), so a wrong guess only costs the fusion.
SHARED_INPUT_SETS = (
    {"q_proj", "k_proj", "v_proj"}, {"query", "key", "value"}, {"q", "k", "v"},
    {"gate_proj", "up_proj"}, {"w1", "w3"},
)
FUSE_SHARED_INPUT = True
"""Whether sibling layers fed the same input run as one group (exact to rounding; measured in
benchmarks/README.md). Off gives the per-layer path, for comparisons."""


_PLAIN_DICT = nn.ParameterDict()


class AdapterParams(nn.ParameterDict):
    """A ParameterDict keyed by adapter name that takes any name.

    A ParameterDict stores each entry as an attribute named like its key, so a library id with a dot
    ("smollm2-v1.2") or a name that is already an attribute ("train", "to", "keys") cannot be a key.
    Such a name is stored under an escaped attribute ("~" + the name with "." as "~d"); the dict's
    keys stay the names themselves. Plain names (every name we generate, and PEFT's "default")
    keep their own attribute, so parameter names read ``lora_A.default`` as before.
    """

    _attrs: dict[str, str] = {}  # name -> attribute, memoised: the forward pass looks names up per layer

    def _key_to_attr(self, key: str) -> str:
        attr = self._attrs.get(key) if isinstance(key, str) else None
        if attr is None:
            key = super()._key_to_attr(key)
            if "." not in key and not key.startswith("~") and not hasattr(_PLAIN_DICT, key):
                attr = key
            else:
                attr = "~" + key.replace("~", "~~").replace(".", "~d")
            self._attrs[key] = attr
        return attr


class LoRALinear(nn.Module):
    """A frozen Linear/Conv1D plus any number of named low-rank adapters.

    Attributes:
        base_layer: the wrapped module; its weight is not copied.
        lora_A[name]: (r, in_features).  lora_B[name]: (out_features, r).
        scaling[name]: alpha / r, or alpha / sqrt(r) with rsLoRA.
        active: the adapters that take part in ``forward``, in order.
        merged: the adapters currently folded into ``base_layer.weight``.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_adaptable(base_layer):
            raise StudioError(
                f"{type(base_layer).__name__} cannot carry a LoRA adapter; supported: {SUPPORTED_TYPES}"
            )
        self.base_layer = base_layer
        self.transposed = not isinstance(base_layer, nn.Linear)
        self.out_features, self.in_features = layer_shape(base_layer)
        self.lora_A = AdapterParams()
        self.lora_B = AdapterParams()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._shared: _SharedInput | None = None  # set by inject_adapter for q/k/v, gate/up, ...
        self._plan_cache: tuple | None = None  # see _plan
        self.quantized = is_quantized(base_layer)
        # The base weight as loaded, kept while an adapter is merged into a bf16/fp16 weight (see
        # merge): a buffer so that Module.to moves it, not persistent so no state_dict carries it.
        self.register_buffer("_pristine", None, persistent=False)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, *, dropout: float = 0.0,
                    rslora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
                    activate: bool = True) -> None:
        """Create adapter ``name`` with A initialised by ``init`` and B = 0.

        ``kaiming`` draws from the random generator in the same order as PEFT (an ``nn.Linear`` for
        A and one for B are built, then A is drawn again), so the same seed gives PEFT's A exactly.
        """
        check_adapter_name(name)
        if name in self.lora_A:
            raise StudioError(f"adapter '{name}' is already on this layer")
        if rank < 1:
            raise StudioError(f"rank must be at least 1 (got {rank})")
        w = self.base_layer.weight
        dtype = dtype or (w.dtype if w.dtype == torch.float32 else torch.float32)
        a = torch.empty(rank, self.in_features, device=w.device, dtype=dtype)
        b = torch.empty(self.out_features, rank, device=w.device, dtype=dtype)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r)'s own init, as in PEFT
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))  # nn.Linear(r, out)'s own init, as in PEFT
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # reset_lora_parameters: loralib's choice
        elif init == "gaussian":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            nn.init.normal_(a, std=1 / rank)
        else:
            raise StudioError(f"unknown initialisation '{init}'; use kaiming or gaussian")
        nn.init.zeros_(b)  # B = 0: the model at step 0 is exactly the base model (section 4.1)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.rank[name] = rank
        self.alpha[name] = float(alpha)
        self.scaling[name] = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout_p[name] = float(dropout)
        if activate and name not in self.active:
            self.active.append(name)

    def set_adapter_weights(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy loaded tensors into adapter ``name`` (shapes must already have been checked)."""
        was_merged = name in self.merged
        if was_merged:
            self.unmerge(name)
        with torch.no_grad():
            self.lora_A[name].copy_(a)
            self.lora_B[name].copy_(b)
        if was_merged:
            self.merge(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        for d in (self.lora_A, self.lora_B):
            if name in d:
                del d[name]
        for d in (self.scaling, self.rank, self.alpha, self.dropout_p):
            d.pop(name, None)
        if name in self.active:
            self.active.remove(name)

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    # -- ΔW, merge, unmerge ----------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s·B·A in fp32, shaped like ``base_layer.weight`` (transposed for Conv1D)."""
        a = self.lora_A[name].detach().float()
        b = self.lora_B[name].detach().float()
        delta = (b @ a) * self.scaling[name]
        return delta.t() if self.transposed else delta

    def _fp32_delta_args(self, name: str):
        """``(m1, m2, s)`` with ΔW = s·m1·m2 shaped like the weight, when W, A and B are all fp32 on
        one device (then merge and unmerge are one fused ``addmm`` pass over W); else None.

        Also None when :meth:`delta_weight` is not this class's own (a subclass, or a test that
        replaces it): ΔW is whatever ``delta_weight`` says, so merge and unmerge then use it."""
        if type(self).delta_weight is not _OWN_DELTA_WEIGHT:
            return None
        w, a, b = self.base_layer.weight, self.lora_A[name].detach(), self.lora_B[name].detach()
        if not (w.dtype == a.dtype == b.dtype == torch.float32 and a.device == w.device == b.device):
            return None
        return ((a.t(), b.t()) if self.transposed else (b, a)) + (self.scaling[name],)

    def merge(self, name: str) -> None:
        """W ← W + s·B·A, computed in fp32; refuses (and leaves W as it was) if a value is not finite.

        fp32 weights: the merged weight is built out of place (one ``addmm``), checked, then copied
        into W; :meth:`unmerge` subtracts it again in place (exact to fp32 rounding, ~1e-7).

        bf16/fp16 weights: W0 + ΔW rounded to 8 (or 11) significant bits cannot be unrounded, so
        a subtraction would leave a rounding error in W0 after every merge/unmerge cycle, and
        swapping adapters would drift the base. Instead the weight as loaded is kept (``_pristine``,
        one copy of this layer's weight while anything is merged into it: for all-linear targets
        about the size of the model's linear layers in its dtype) and W is always rebuilt as
        round(W0 + Σ merged ΔW) from it, so unmerging the last adapter restores W0 bit for bit.

        A 4-bit or 8-bit (bitsandbytes) base cannot take a merge in place: refused; such an adapter
        runs unmerged, and ``merge``/export writes a de-quantised merged model instead.
        """
        if name in self.merged:
            return
        if self.quantized:
            raise StudioError(f"adapter '{name}' cannot be merged into a quantised ({quant_name(self.base_layer)}) "
                              "layer in place", hint="use it unmerged, or export a merged model")
        w = self.base_layer.weight
        fast = self._fp32_delta_args(name)
        if fast is not None:
            m1, m2, s = fast
            merged = torch.addmm(w.detach(), m1, m2, alpha=s)
        elif w.dtype == torch.float32:
            merged = w.detach() + self.delta_weight(name).to(w.device)
        else:
            merged = self._rebuilt(self.merged + [name])
        if not torch.isfinite(merged).all():
            raise StudioError(f"merging adapter '{name}' gives non-finite weights; the adapter is broken")
        with torch.no_grad():
            if w.dtype != torch.float32 and self._pristine is None:
                self._pristine = w.detach().clone()
            w.copy_(merged.to(w.dtype))
        self.merged.append(name)

    def _rebuilt(self, names: list[str]) -> torch.Tensor:
        """W0 + Σ ΔW of ``names`` in fp32, from the weight as loaded (bf16/fp16 weights only)."""
        w0 = self._pristine if self._pristine is not None else self.base_layer.weight.detach()
        out = w0.float()
        for n in names:
            out += self.delta_weight(n).to(out.device)
        return out

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` out of W: W − s·B·A in place for fp32; for bf16/fp16, W0 + the other
        merged ΔW's rebuilt from the kept weight (W0 itself, bit for bit, once nothing is merged)."""
        if name not in self.merged:
            return
        w = self.base_layer.weight
        rest = [n for n in self.merged if n != name]
        fast = self._fp32_delta_args(name)
        with torch.no_grad():
            if fast is not None:
                m1, m2, s = fast
                w.addmm_(m1, m2, alpha=-s)
            elif w.dtype == torch.float32 or self._pristine is None:
                w.copy_((w.detach().float() - self.delta_weight(name).to(w.device)).to(w.dtype))
            elif rest:
                w.copy_(self._rebuilt(rest).to(w.dtype))
            else:
                w.copy_(self._pristine)
                self._pristine = None
        self.merged.remove(name)

    def base_weight(self) -> torch.Tensor:
        """W0 as loaded, whatever is merged (fp32 weights: W − Σ merged ΔW, exact to fp32 rounding)."""
        if self._pristine is not None:
            return self._pristine
        w = self.base_layer.weight.detach()
        if not self.merged:
            return w
        return (w.float() - sum(self.delta_weight(n).to(w.device) for n in self.merged)).to(w.dtype)

    # -- forward ---------------------------------------------------------------------------------
    def _plan(self):
        """``(name, A, B, s)`` of the one adapter the fused path would run, or None when it cannot
        (several or no unmerged active adapters, dropout in training).

        Called for every LoRA layer in every forward pass, so the answer is kept and only worked
        out again when something it depends on changed: the active or merged lists, the training
        flag, the adapter's scaling or dropout, or the A/B parameter objects themselves (replaced by
        ``load_state_dict(assign=True)`` or ``Module.to`` with parameter swapping off)."""
        c = self._plan_cache
        if c is not None:
            (active, merged, training, name, a, b, s, p, a_params, a_attr, b_params, b_attr, plan) = c
            if (active == self.active and merged == self.merged and training == self.training
                    and a_params.get(a_attr) is a and b_params.get(b_attr) is b
                    and self.scaling.get(name) == s and self.dropout_p.get(name) == p):
                return plan
        names = [n for n in self.active if n not in self.merged]
        if len(names) != 1:
            self._plan_cache = None
            return None
        name = names[0]
        la, lb = self.lora_A, self.lora_B
        a_attr, b_attr = la._key_to_attr(name), lb._key_to_attr(name)
        a, b = la._parameters[a_attr], lb._parameters[b_attr]
        s, p = self.scaling[name], self.dropout_p[name]
        plan = (name, a, b, s) if (p == 0.0 or not self.training) else None
        self._plan_cache = (list(self.active), list(self.merged), self.training, name, a, b, s, p,
                            la._parameters, a_attr, lb._parameters, b_attr, plan)
        return plan

    def _fused(self, x: torch.Tensor):
        """:meth:`_plan` plus what depends on the call: a frozen, unquantised base layer whose
        weight has x's dtype (the compute dtype; under autocast, also autocast's dtype), A and B on
        x's device. ``(name, A, B, s, W, bias)`` or None.

        A and B may be in another dtype than x: the adapter is kept in fp32 (master weights, as
        PEFT does by default) while a bf16/fp16 base computes in its own dtype; the autograd
        functions cast A and B to x's dtype for the products and hand their gradients back in fp32.
        """
        plan = self._plan()
        if plan is None:
            return None
        base = self.base_layer
        w, bias = base.weight, base.bias
        if (w.requires_grad or (bias is not None and bias.requires_grad) or x.dtype != w.dtype
                or plan[1].device != x.device or (torch.is_autocast_enabled(x.device.type)
                                                  and _autocast_dtype(x.device.type) != x.dtype)):
            return None
        return plan + (w, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._fused(x)
        if f is not None:
            n, a, b, s, w, bias = f
            if self._shared is not None and FUSE_SHARED_INPUT:
                out = self._shared.output_for(self, x, n)
                if out is not None:
                    return out
            return _LoRAFunction.apply(x, w, bias, a, b, s, self.transposed)
        if self.quantized:
            plan = self._plan()
            if plan is not None and plan[1].device == x.device:
                _, a, b, s = plan
                return _LoRAAddFunction.apply(x, self.base_layer(x), a, b, s)
        names = [n for n in self.active if n not in self.merged]
        if not names:
            return self.base_layer(x)
        result = self.base_layer(x)
        for n in names:
            a, b = self.lora_A[n], self.lora_B[n]
            p = self.dropout_p[n] if self.training else 0.0
            xd = F.dropout(x, p=p, training=True) if p > 0 else x  # skip the op entirely at p = 0
            xd = xd.to(a.dtype)
            delta = F.linear(F.linear(xd, a), b) * self.scaling[n]
            result = result + delta.to(result.dtype)
        return result

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}"]
        for n in self.adapters:
            flag = "merged" if n in self.merged else ("active" if n in self.active else "inactive")
            parts.append(f"{n}: r={self.rank[n]} s={self.scaling[n]:g} {flag}")
        return ", ".join(parts)


_OWN_DELTA_WEIGHT = LoRALinear.delta_weight

# -- model-level functions -------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in ``model`` with its qualified name (the name of the wrapped module)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _names_over_layers(model: nn.Module, which: Callable[[LoRALinear], Iterable[str]]) -> list[str]:
    """The adapter names ``which(layer)`` gives over every LoRA layer, each once, in first-seen order."""
    names: list[str] = []
    for _, layer in lora_layers(model):
        for n in which(layer):
            if n not in names:
                names.append(n)
    return names


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter on the model."""
    return _names_over_layers(model, lambda layer: layer.adapters)


def _get_parent(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def check_adapter_name(name: str) -> None:
    """Refuse an adapter name no layer can hold: not a string, or empty. Any other name works, dots
    and names like "train" included (see :class:`AdapterParams`)."""
    if not isinstance(name, str) or not name.strip():
        raise StudioError("an adapter name must not be empty")


def inject_adapter(model: nn.Module, targets: Iterable[str], name: str = "default", *, rank: int = 8,
                   alpha: float = 16.0, dropout: float = 0.0, rslora: bool = False,
                   init: str = "kaiming", dtype: torch.dtype | None = None,
                   freeze_base: bool = True) -> list[str]:
    """Add adapter ``name`` to each module named in ``targets`` (qualified names); return them.

    Modules are visited in ``model.named_modules()`` order whatever the order of ``targets``, so the
    random draws for A are the same as PEFT's for the same seed. With ``freeze_base`` every parameter
    that is not a LoRA matrix is frozen.
    """
    wanted = set(targets)
    if not wanted:
        raise StudioError("no target modules selected")
    modules = dict(model.named_modules())
    missing = sorted(wanted - set(modules))
    if missing:
        raise StudioError(f"no module named '{missing[0]}' in this model")
    done: list[str] = []
    for qname in list(modules):
        if qname not in wanted:
            continue
        module = modules[qname]
        if not isinstance(module, LoRALinear):
            if not is_adaptable(module):
                raise StudioError(
                    f"module '{qname}' is a {type(module).__name__}; LoRA here supports {SUPPORTED_TYPES}"
                )
            wrapper = LoRALinear(module)
            parent, child = _get_parent(model, qname)
            setattr(parent, child, wrapper)
            module = wrapper
        module.add_adapter(name, rank, alpha, dropout=dropout, rslora=rslora, init=init, dtype=dtype)
        done.append(qname)
    _group_shared_inputs(model)
    if freeze_base:
        mark_only_lora_trainable(model, [name])
    return done


def _group_shared_inputs(model: nn.Module) -> None:
    """Give sibling LoRALinears that (by name) read the same input one :class:`_SharedInput`."""
    for parent in model.modules():
        children = {k: m for k, m in parent.named_children() if isinstance(m, LoRALinear)}
        for m in children.values():
            m._shared = None
        for names in SHARED_INPUT_SETS:
            found = [children[k] for k in sorted(names) if k in children]
            by_width: dict[int, list[LoRALinear]] = {}
            for m in found:
                by_width.setdefault(m.in_features, []).append(m)
            for group in by_width.values():
                if len(group) > 1:
                    shared = _SharedInput(group)
                    for m in group:
                        m._shared = shared


def mark_only_lora_trainable(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """``requires_grad`` on the LoRA matrices of adapters ``names`` (all if None), off on all else."""
    keep = set(lora_parameters(model, names).values())
    for p in model.parameters():
        p.requires_grad_(any(p is k for k in keep))


def lora_parameters(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """The LoRA matrices of adapters ``names`` (all if None), keyed ``<module>.lora_A.<adapter>``."""
    wanted = None if names is None else set(names)
    out: dict[str, nn.Parameter] = {}
    for qname, layer in lora_layers(model):
        for n in layer.adapters:
            if wanted is None or n in wanted:
                out[f"{qname}.lora_A.{n}"] = layer.lora_A[n]
                out[f"{qname}.lora_B.{n}"] = layer.lora_B[n]
    return out


def adapter_tensors(model: nn.Module, name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` for adapter ``name`` (detached, on their device)."""
    return {q: (l.lora_A[name].detach(), l.lora_B[name].detach())
            for q, l in lora_layers(model) if name in l.lora_A}


def set_active_adapters(model: nn.Module, names: Iterable[str]) -> None:
    """Make exactly ``names`` take part in the forward pass (merged ones stay merged)."""
    names = list(names)
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise StudioError(f"no adapter named '{n}' on this model (it has: {', '.join(known) or 'none'})")
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.lora_A]


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that take part in the forward pass (merged or not)."""
    return _names_over_layers(model, lambda layer: layer.active)


def merge_adapter(model: nn.Module, name: str = "default") -> None:
    """Fold adapter ``name`` into the base weights of every layer that has it.

    All-or-nothing: if any layer would get a non-finite weight, layers merged so far are unmerged.
    """
    done: list[LoRALinear] = []
    try:
        for _, layer in lora_layers(model):
            if name in layer.lora_A and name not in layer.merged:
                layer.merge(name)
                done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge(name)
        raise
    if not done and name not in adapter_names(model):
        raise StudioError(f"no adapter named '{name}' on this model")


def unmerge_adapter(model: nn.Module, name: str = "default") -> None:
    for _, layer in lora_layers(model):
        layer.unmerge(name)


def merged_adapters(model: nn.Module) -> list[str]:
    """The adapters folded into the base weights."""
    return _names_over_layers(model, lambda layer: layer.merged)


def swap_adapter(model: nn.Module, out_name: str, in_name: str, *, merged: bool | None = None) -> None:
    """The paper's task switch: take adapter ``out_name`` out and put ``in_name`` in, base untouched.

    ``merged`` decides whether ``in_name`` is folded into the weights (zero inference overhead) or
    applied unmerged; by default it follows how ``out_name`` was applied.
    """
    known = adapter_names(model)
    if in_name not in known:
        raise StudioError(f"no adapter named '{in_name}' on this model")
    if merged is None:
        merged = out_name in merged_adapters(model)
    unmerge_adapter(model, out_name)
    others = [n for n in active_adapters(model) if n != out_name and n != in_name]
    set_active_adapters(model, others + [in_name])
    if merged:
        merge_adapter(model, in_name)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` everywhere (unmerging it first); unwrap layers left with none."""
    for qname, layer in list(lora_layers(model)):
        layer.delete_adapter(name)
        if not layer.adapters:
            parent, child = _get_parent(model, qname)
            setattr(parent, child, layer.base_layer)
    _group_shared_inputs(model)


def unload(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Take every LoRALinear out, leaving the plain model (PEFT's ``unload`` / ``merge_and_unload``).

    With ``merge`` the active adapters are folded in first; otherwise merged ones are taken out, so
    the result is the base model.
    """
    for qname, layer in list(lora_layers(model)):
        if merge:
            for n in layer.active:
                layer.merge(n)
        else:
            for n in list(layer.merged):
                layer.unmerge(n)
        parent, child = _get_parent(model, qname)
        setattr(parent, child, layer.base_layer)
    return model
