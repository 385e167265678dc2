"""An adapter on disk, in PEFT's own format, both ways.

An adapter folder holds

* ``adapter_config.json``: PEFT's ``LoraConfig`` as PEFT 0.21 writes it (``peft_type`` "LORA", ``r``,
  ``lora_alpha``, ``target_modules``, ``use_rslora``, ``rank_pattern`` ...);
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` (r × d_in) and
  ``...lora_B.weight`` (d_out × r) for every adapted module. PEFT stores A as (r, d_in) for GPT-2's
  ``Conv1D`` too (its ``fan_in_fan_out`` only changes how ΔW is laid onto the transposed weight), which
  is exactly how :class:`core.lora.LoRALinear` holds it, so no tensor is ever transposed here;
* ``studio.json`` (ours, optional on reading): format version, the base model and its fingerprint,
  dataset, training summary, loss curve, creation time.

``PeftModel.from_pretrained(base, folder)`` reads what :func:`save_adapter` writes with the same
outputs, and :func:`read_adapter` reads a plain LoRA or rsLoRA adapter PEFT wrote. Anything that
would change the forward pass in a way LoRALinear cannot express (DoRA, ``modules_to_save``, biases,
PiSSA-style base-weight rewrites, aLoRA, ...) is refused with one :class:`StudioError` that names the
folder and says what to do; an adapter is loaded completely or not at all. Per-module ranks and
alphas (PEFT's ``rank_pattern`` / ``alpha_pattern``) are supported: each LoRALinear keeps its own
rank and scaling, and :mod:`core.combine` needs them for adapters whose target sets differ.

Reading and its checks are in :mod:`core.adapter_read`; this module writes an adapter and fits one
to a model, and is the one the rest of the studio imports (``AdapterFiles`` and ``read_adapter``
are here too).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
import torch
from torch import nn

from core import __version__, atomic, lora
from core.adapter_read import (CONFIG_FILE, FORMAT_VERSION, PEFT_PREFIX, STUDIO_FILE, WEIGHTS_FILE, AdapterFiles,
                               read_adapter)
from core.errors import StudioError

FORMAT = "lora-studio-adapter"
# What ``--model default`` is on the Hub: written as base_model_name_or_path so that PEFT's
# AutoPeftModelForCausalLM finds the base model of an adapter trained on the bundled one.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


# -- writing ---------------------------------------------------------------------------------------

def _model_fingerprint(model: nn.Module) -> dict | None:
    try:
        from core.fingerprint import fingerprint
    except ModuleNotFoundError as e:  # core.fingerprint is optional for the engine; the check only warns
        if e.name != "core.fingerprint":
            raise
        return None
    return fingerprint(model)


def _layers_with(model: nn.Module, name: str) -> list[tuple[str, lora.LoRALinear]]:
    layers = [(q, layer) for q, layer in lora.lora_layers(model) if name in layer.lora_A]
    if not layers:
        known = lora.adapter_names(model)
        raise StudioError(f"no adapter named '{name}' on this model to save "
                          f"(it has: {', '.join(known) or 'none'})")
    return layers


def _is_rslora(layer: lora.LoRALinear, name: str) -> bool | None:
    """Whether this layer's scaling is alpha/sqrt(r) (None when r = 1 makes both the same)."""
    r, alpha, s = layer.rank[name], layer.alpha[name], layer.scaling[name]
    plain, rs = alpha / r, alpha / math.sqrt(r)
    if math.isclose(plain, rs):
        return None
    return math.isclose(s, rs, rel_tol=1e-9)


def adapter_from_model(model: nn.Module, name: str = "default") -> AdapterFiles:
    """Adapter ``name`` of an injected model as :class:`AdapterFiles` (tensors copied to the CPU, fp32)."""
    layers = _layers_with(model, name)
    flags = {f for f in (_is_rslora(layer, name) for _, layer in layers) if f is not None}
    if len(flags) > 1:
        raise StudioError(f"adapter '{name}' mixes rsLoRA and plain scaling across layers; "
                          "PEFT's format has one use_rslora flag per adapter")
    rslora = flags.pop() if flags else False
    ranks = {q: layer.rank[name] for q, layer in layers}
    alphas = {q: layer.alpha[name] for q, layer in layers}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = Counter(layer.dropout_p[name] for _, layer in layers)
    tensors = {q: (layer.lora_A[name].detach().to("cpu", torch.float32).clone(),
                   layer.lora_B[name].detach().to("cpu", torch.float32).clone()) for q, layer in layers}
    return AdapterFiles(folder=None, config={}, rank=rank, alpha=alpha, rslora=rslora,
                        dropout=dropouts.most_common(1)[0][0], targets=list(tensors), tensors=tensors,
                        ranks={q: r for q, r in ranks.items() if r != rank},
                        alphas={q: a for q, a in alphas.items() if a != alpha})


def _target_modules(model: nn.Module | None, targets: list[str]) -> list[str]:
    """What to write as ``target_modules``: the modules' last names when those select exactly
    ``targets`` in ``model`` by PEFT's suffix rule (compact, and what PEFT users expect), else the
    full qualified names (PEFT matches a full name exactly)."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    if model is None:
        return sorted(targets)
    chosen = set()
    for qname, module in model.named_modules():
        if qname.endswith(".base_layer") and isinstance(model.get_submodule(qname.rsplit(".", 1)[0]),
                                                        lora.LoRALinear):
            continue
        if any(qname == leaf or qname.endswith("." + leaf) for leaf in leaves):
            chosen.add(qname)
    return leaves if chosen == set(targets) else sorted(targets)


def _pattern(values: dict) -> dict:
    """Per-module overrides as PEFT pattern keys: PEFT matches ``(.*\\.)?(key)$`` with ``re.match``,
    so an escaped full name picks that one module and no other."""
    return {re.escape(k): v for k, v in values.items()}


def peft_config(adapter: AdapterFiles, *, base_model: str | None, target_modules: list[str],
                fan_in_fan_out: bool) -> dict:
    """adapter_config.json with every key PEFT 0.21 writes for a LoRA adapter (``peft_version`` is
    left for PEFT to fill in: we are not PEFT)."""
    base = DEFAULT_MODEL_ID if base_model == "default" else base_model
    alpha = adapter.alpha
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": _pattern(adapter.alphas),
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_bias": False,
        "lora_dropout": adapter.dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": adapter.rank,
        "rank_pattern": _pattern(adapter.ranks),
        "revision": None,
        "target_modules": target_modules,
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": adapter.rslora,
        "velora_config": None,
    }


def write_adapter(adapter: AdapterFiles, folder: str | Path, *, base_model: str | None = None,
                  studio: dict | None = None, model: nn.Module | None = None) -> Path:
    """Write ``adapter`` as a PEFT adapter folder plus studio.json, all or nothing.

    ``base_model`` defaults to the one the adapter names. ``model`` (the base model, with or without
    LoRA layers) lets ``target_modules`` be written as short names, GPT-2's ``fan_in_fan_out`` be set
    and the fingerprint be computed; without it full names are written. studio.json is built from
    the computed facts, then what ``adapter.studio`` already held, then ``studio`` (which wins).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    base_model = base_model if base_model is not None else adapter.base_model
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    if model is not None:
        fan_in_fan_out = False
        modules = dict(model.named_modules())
        for q in adapter.targets:
            m = modules.get(q)
            base = m.base_layer if isinstance(m, lora.LoRALinear) else m
            fan_in_fan_out |= base is not None and not isinstance(base, nn.Linear)
    config = peft_config(adapter, base_model=base_model,
                         target_modules=_target_modules(model, adapter.targets), fan_in_fan_out=fan_in_fan_out)
    tensors = {}
    for q in adapter.targets:
        a, b = adapter.tensors[q]
        tensors[f"{PEFT_PREFIX}{q}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{q}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "studio_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"spec": base_model},
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "rslora": adapter.rslora,
        "targets": len(adapter.targets),
        "trainable_parameters": adapter.trainable_parameters,
    }
    computed = set(info) - {"created", "base_model"}

    def add(facts: dict, keep: set[str] = frozenset()) -> None:
        for k, v in facts.items():
            if k in keep:
                continue
            if k == "base_model" and isinstance(v, dict):
                info["base_model"].update(v)
            else:
                info[k] = v

    # what the adapter already knew (read from disk, or a combination's sources) ...
    add(adapter.studio, keep=computed)
    if base_model is not None:
        info["base_model"]["spec"] = base_model
    if model is not None:  # ... then the model at hand, which is the truth about the base ...
        cfg = getattr(model, "config", None)
        archs = getattr(cfg, "architectures", None) or [type(model).__name__]
        info["base_model"]["architecture"] = archs[0]
        info["fingerprint"] = _model_fingerprint(model)
        from core.quant import quantization_of

        held = quantization_of(model)
        if held != "none":  # a 4-bit/8-bit base (QLoRA): say which
            info["base_model"]["quantization"] = held
    add(studio or {})  # ... then the caller's facts (dataset, training, loss curve, ...), which win
    with atomic.staged_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / STUDIO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    adapter.folder, adapter.config, adapter.studio = folder, config, info
    return folder


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default", *, base_model: str,
                 studio: dict | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``folder`` (replaced atomically if it exists).

    ``base_model`` is the model spec the adapter belongs to (``default``, a folder, a repo id);
    ``studio`` adds to studio.json (``dataset``, ``training``, ``loss_curve``, ``fingerprint``, ...).
    The base model's fingerprint is computed here unless ``studio`` carries one.
    """
    adapter = adapter_from_model(model, name)
    return write_adapter(adapter, folder, base_model=base_model, studio=studio, model=model)


# -- against a model -------------------------------------------------------------------------------

def _module_names(model: nn.Module) -> set[str]:
    return {q for q, _ in model.named_modules() if not q.endswith(".base_layer")}


def align_to(adapter: AdapterFiles, model: nn.Module) -> AdapterFiles:
    """``adapter`` with its module names moved onto ``model``'s when they differ by one common prefix.

    An adapter trained on the bare transformer (``layers.0.self_attn.q_proj``, PEFT over ``AutoModel``)
    fits the causal LM (``model.layers.0.self_attn.q_proj``), and the other way round. Only a prefix
    that maps *every* target onto an existing module is taken; otherwise ``adapter`` comes back as it
    was and :func:`check_compatible` names what is missing.
    """
    names = _module_names(model)
    if all(t in names for t in adapter.targets):
        return adapter
    first = adapter.targets[0]
    candidates = set()
    for q in names:  # the model's names one prefix longer: prefix + target
        if q.endswith("." + first):
            candidates.add(("add", q[: -len(first)]))
    parts = first.split(".")
    for i in range(1, len(parts)):  # the adapter's names one prefix longer: drop it
        if ".".join(parts[i:]) in names:
            candidates.add(("drop", ".".join(parts[:i]) + "."))
    for how, prefix in sorted(candidates):
        if how == "add":
            rename = {t: prefix + t for t in adapter.targets}
        elif all(t.startswith(prefix) for t in adapter.targets):
            rename = {t: t[len(prefix):] for t in adapter.targets}
        else:
            continue
        if all(n in names for n in rename.values()) and len(set(rename.values())) == len(rename):
            return AdapterFiles(folder=adapter.folder, config=adapter.config, rank=adapter.rank,
                                alpha=adapter.alpha, rslora=adapter.rslora, dropout=adapter.dropout,
                                targets=[rename[t] for t in adapter.targets],
                                tensors={rename[t]: v for t, v in adapter.tensors.items()},
                                studio=adapter.studio, ranks={rename[t]: v for t, v in adapter.ranks.items()},
                                alphas={rename[t]: v for t, v in adapter.alphas.items()})
    return adapter


def check_compatible(adapter: AdapterFiles, model: nn.Module) -> list[str]:
    """Every reason ``adapter`` cannot go onto ``model``, in file order ([] if it fits).

    For each module: it exists (after :func:`align_to`), it is a Linear or Conv1D (possibly already
    LoRA-wrapped), and its (d_out, d_in) is (B rows, A columns). Touches nothing.
    """
    adapter = align_to(adapter, model)
    modules = dict(model.named_modules())
    problems = []
    for q in adapter.targets:
        a, b = adapter.tensors[q]
        module = modules.get(q)
        if module is None:
            problems.append(f"module '{q}' is not in this model")
            continue
        if not (isinstance(module, lora.LoRALinear) or lora.is_adaptable(module)):
            problems.append(f"module '{q}' is a {type(module).__name__}, which cannot carry LoRA")
            continue
        d_out, d_in = lora.layer_shape(module)
        got = (b.shape[0], a.shape[1])
        if got != (d_out, d_in):
            problems.append(f"module '{q}': the model's layer is {d_out} × {d_in} (out × in) but the adapter's "
                            f"ΔW is {got[0]} × {got[1]}")
    return problems


def fingerprint_warning(adapter: AdapterFiles, model: nn.Module, *, now: dict | None = None) -> str | None:
    """A warning when studio.json's base-model fingerprint differs from ``model``'s, else None.

    Only a warning: the shapes check decides whether the adapter fits; a different fingerprint means
    it was trained on other weights of the same shape (another fine-tune, another quantisation).
    ``now``: the model's fingerprint when known (core.models.LoadedModel.fingerprint, taken at load).
    """
    saved = adapter.studio.get("fingerprint")
    if not isinstance(saved, dict):
        return None
    now = now or _model_fingerprint(model)
    if not now:
        return None
    trained_on = adapter.base_model or "another model"
    if saved.get("shapes") and saved["shapes"] != now.get("shapes"):
        return f"this adapter was trained on {trained_on}, whose architecture differs from this model's"
    if saved.get("content") and now.get("content") and saved["content"] != now["content"]:
        return (f"this adapter was trained on {trained_on}; this model has the same shapes but different "
                "weights, so its outputs may not be what the adapter learned")
    return None


def load_adapter(model: nn.Module, folder: str | Path | AdapterFiles, name: str = "default", *,
                 activate: bool = True, trainable: bool = False) -> AdapterFiles:
    """Put the adapter in ``folder`` (or an :class:`AdapterFiles`) onto ``model`` as adapter ``name``.

    Returns the adapter with module names as in ``model`` (see :func:`align_to`).
    Every tensor's shape is checked against the model before anything is injected; the first problem
    is raised, naming the module, the expected and the found shape. Injection is then all or nothing.
    The new matrices are in fp32; they require grad only with ``trainable`` (as PEFT's
    ``is_trainable``: a loaded adapter is for inference unless asked otherwise, so forward passes
    build no autograd graph for it). The base weights' ``requires_grad`` is left as it was. With
    ``activate`` the adapter joins the active ones.
    The global random state is left as it was (injection initialises A before the loaded values
    replace it).
    """
    adapter = folder if isinstance(folder, AdapterFiles) else read_adapter(folder)
    adapter = align_to(adapter, model)
    where = adapter.folder or "the combined adapter"
    if name in lora.adapter_names(model):
        raise StudioError(f"this model already has an adapter named '{name}'",
                          hint="remove it first or load the new one under another name")
    problems = check_compatible(adapter, model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StudioError(f"adapter {where} does not fit this model: {problems[0]}{more}",
                          hint="load it onto the base model it was trained on")
    groups: dict[tuple[int, float], list[str]] = {}
    for q in adapter.targets:
        groups.setdefault((adapter.module_rank(q), adapter.module_alpha(q)), []).append(q)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            for (rank, alpha), names in groups.items():
                lora.inject_adapter(model, names, name, rank=rank, alpha=alpha, dropout=adapter.dropout,
                                    rslora=adapter.rslora, freeze_base=False)
        layers = dict(lora.lora_layers(model))
        for q in adapter.targets:
            a, b = adapter.tensors[q]
            layer = layers[q]
            w = layer.lora_A[name]
            layer.set_adapter_weights(name, a.to(w.device, w.dtype), b.to(w.device, w.dtype))
            layer.lora_A[name].requires_grad_(trainable)
            layer.lora_B[name].requires_grad_(trainable)
            if not activate and name in layer.active:
                layer.active.remove(name)
    except BaseException:
        lora.remove_adapter(model, name)
        raise
    return adapter

