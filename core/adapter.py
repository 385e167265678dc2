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
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
import torch
from torch import nn

from core import __version__, atomic, lora, safeio
from core.errors import StudioError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
STUDIO_FILE = "studio.json"
FORMAT = "lora-studio-adapter"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
# What ``--model default`` is on the Hub: written as base_model_name_or_path so that PEFT's
# AutoPeftModelForCausalLM finds the base model of an adapter trained on the bundled one.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# <module path>.lora_A.weight, optionally with the adapter name (".default") that state_dict()
# keys carry and PEFT's own save strips.
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")

# adapter_config.json keys that do not change what the adapter computes once loaded.
_HARMLESS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias",
    "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "fan_in_fan_out", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "exclude_modules", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "loftq_config", "eva_config", "lora_bias", "use_dora", "modules_to_save",
    "runtime_config", "target_modules_to_tie",
}
# init_lora_weights values whose saved A, B are a plain LoRA on the unchanged base weights.
_PLAIN_INITS = {True, False, "gaussian", "orthogonal", "eva"}


@dataclass
class AdapterFiles:
    """An adapter read from disk (or built by :mod:`core.combine`), tensors on the CPU.

    ``rank`` and ``alpha`` are the adapter-wide values; a module listed in ``ranks`` / ``alphas`` has
    its own (PEFT's ``rank_pattern`` / ``alpha_pattern``). Use :meth:`scaling` rather than
    recomputing it.
    """

    folder: Path | None
    config: dict
    """adapter_config.json as read (or as it will be written)."""
    rank: int
    alpha: float
    rslora: bool
    dropout: float
    targets: list[str]
    """Qualified module names of the base model, block by block (layer numbers in numeric order)."""
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """``{module: (A (r × d_in), B (d_out × r))}``."""
    studio: dict = field(default_factory=dict)
    """studio.json (empty for an adapter PEFT wrote)."""
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)

    def module_rank(self, module: str) -> int:
        return self.ranks.get(module, self.rank)

    def module_alpha(self, module: str) -> float:
        return self.alphas.get(module, self.alpha)

    def scaling(self, module: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, for ``module``."""
        r = self.module_rank(module)
        return self.module_alpha(module) / (math.sqrt(r) if self.rslora else r)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = s·B·A (d_out × d_in) in fp32: the Linear layout, even for a Conv1D module."""
        a, b = self.tensors[module]
        return (b.float() @ a.float()) * self.scaling(module)

    @property
    def trainable_parameters(self) -> int:
        """Σ r·(d_in + d_out): the numbers in the file."""
        return sum(a.numel() + b.numel() for a, b in self.tensors.values())

    @property
    def name(self) -> str:
        return self.studio.get("name") or (self.folder.name if self.folder else "combined")

    @property
    def base_model(self) -> str | None:
        """The base model the adapter was trained on, as its writer named it."""
        base = self.studio.get("base_model")
        if isinstance(base, dict) and base.get("spec"):
            return str(base["spec"])
        return self.config.get("base_model_name_or_path")


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


# -- reading ---------------------------------------------------------------------------------------

def _refuse(folder: Path, what: str, todo: str) -> StudioError:
    return StudioError(f"adapter {folder}: {what}", hint=todo)


def _check_config(folder: Path, cfg: dict) -> None:
    """Refuse every adapter_config.json option that makes PEFT compute something LoRALinear does not."""
    convert = "train it as plain LoRA, or convert it to a plain LoRA adapter with PEFT first"
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise _refuse(folder, f"this is a {peft_type or 'non-PEFT'} adapter, not LoRA "
                              f"(adapter_config.json peft_type={peft_type!r})",
                      "only LoRA adapters can be loaded")
    if cfg.get("use_dora"):
        raise _refuse(folder, "this is a DoRA adapter (use_dora: true); DoRA rescales each weight "
                              "column by a learned magnitude, which LoRA Studio does not implement",
                      "merge it into its base model with PEFT (merge_and_unload) or train a plain LoRA")
    if cfg.get("modules_to_save"):
        saved = cfg["modules_to_save"]
        raise _refuse(folder, f"it also saves whole modules "
                              f"({', '.join(map(str, saved)) if isinstance(saved, list) else repr(saved)[:80]}: "
                              "modules_to_save), which a LoRA adapter cannot carry",
                      "merge it with PEFT (merge_and_unload) and use the merged model as the base")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise _refuse(folder, f"it trains biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r})",
                      "only adapters with bias 'none' can be loaded")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, (bool, str)) and init in _PLAIN_INITS):
        raise _refuse(folder, f"it was initialised with {init!r}; its A and B only work on a modified base "
                              "model or with a LoRA variant (PiSSA, OLoRA, CorDA and LoftQ rewrite the base "
                              "weights)", convert)
    variants = {
        "alora_invocation_tokens": "an activated LoRA (aLoRA) only acts after its invocation tokens",
        "use_qalora": "QA-LoRA pools its input in groups",
        "layer_replication": "it duplicates layers of the base model",
        "target_parameters": "it adapts raw parameters (e.g. mixture-of-experts weights), not layers",
        "trainable_token_indices": "it also trains token embeddings",
        "megatron_config": "it is laid out for Megatron's parallel layers",
        "use_bdlora": "block-diagonal LoRA is a variant this version does not implement",
        "arrow_config": "Arrow routes between several adapters",
        "kasa_config": "KaSA is a variant this version does not implement",
        "monteclora_config": "MonteCLoRA is a variant this version does not implement",
        "velora_config": "VeLoRA is a variant this version does not implement",
        "lora_ga_config": "LoRA-GA rewrites the base weights",
        "corda_config": "CorDA rewrites the base weights",
    }
    for key, why in variants.items():
        if cfg.get(key):
            raise _refuse(folder, f"{key} is set: {why}; LoRA Studio loads plain LoRA and rsLoRA only", convert)
    unknown = [k for k, v in cfg.items()
               if k not in _HARMLESS and k not in variants and v not in (None, False, {}, [], "")]
    if unknown:
        raise _refuse(folder, f"adapter_config.json sets {', '.join(unknown)}, which this version does not know",
                      "it may need a newer LoRA Studio; a plain LoRA adapter sets none of these")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _refuse(folder, f"adapter_config.json: r must be a positive integer (got {r!r})",
                      "fix or rewrite the file")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _refuse(folder, f"adapter_config.json: lora_alpha must be a number (got {alpha!r})",
                      "fix or rewrite the file")
    _check_field_types(folder, cfg)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except (re.error, RecursionError, OverflowError):
        return False


def _check_field_types(folder: Path, cfg: dict) -> None:
    """The fields read later (targets, per-module ranks and alphas, dropout) have the types PEFT
    writes; anything else is refused here rather than failing deep inside with a TypeError."""
    fix = "fix or rewrite the file"
    targets = cfg.get("target_modules")
    if not (targets is None or (isinstance(targets, str) and _regex_ok(targets))
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise _refuse(folder, f"adapter_config.json: target_modules must be a list of module names or a "
                              f"regular expression (got {str(targets)[:80]!r})", fix)
    for key, ok, what in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                           "positive integers"), ("alpha_pattern", _number, "numbers")):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(_regex_ok(k) and ok(v) for k, v in pattern.items()):
            raise _refuse(folder, f"adapter_config.json: {key} must map module names to {what} "
                                  f"(got {str(pattern)[:80]!r})", fix)
    dropout = cfg.get("lora_dropout", 0.0) or 0.0
    if not _number(dropout) or not 0 <= dropout <= 1:
        raise _refuse(folder, f"adapter_config.json: lora_dropout must be a number in [0, 1] (got {dropout!r})", fix)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets_match(target_modules, module: str) -> bool:
    """PEFT's check_target_module_exists for a list or a regular expression."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None or target_modules == "all-linear"
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        if pickled:
            raise _refuse(folder, f"its weights are in {pickled[0]}, a pickle file, which LoRA Studio never "
                                  "opens (unpickling can run arbitrary code)",
                          "convert it to adapter_model.safetensors where you trust the file, e.g. with "
                          "PeftModel.from_pretrained(...).save_pretrained(..., safe_serialization=True)")
        raise _refuse(folder, f"no {WEIGHTS_FILE} in the folder", "choose a folder holding a LoRA adapter")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _refuse(folder, f"{WEIGHTS_FILE} cannot be read ({e})", "copy or export the adapter again") from None


def _natural(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10`` (safetensors stores keys alphabetically)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _lora_pairs(folder: Path, raw: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The weights file's tensors as module → {"A": lora_A, "B": lora_B}; anything else is refused."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in raw.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _KEY.match(k)
        if not m:
            raise _refuse(folder, f"{WEIGHTS_FILE} holds '{key}', which is not a LoRA A or B matrix of a linear "
                                  "layer (embedding LoRA, DoRA magnitudes or saved modules are not supported)",
                          "load plain LoRA adapters of linear layers only")
        if m["name"]:
            names.add(m["name"])
        pairs.setdefault(m["module"], {})[m["which"]] = t
    if len(names) > 1:
        raise _refuse(folder, f"{WEIGHTS_FILE} holds several adapters ({', '.join(sorted(names))})",
                      "save each adapter into its own folder")
    if not pairs:
        raise _refuse(folder, f"{WEIGHTS_FILE} holds no LoRA matrices", "choose a folder holding a LoRA adapter")
    return pairs


def _read_object(folder: Path, path: Path) -> dict:
    """One of the adapter's JSON files, which must hold an object; a damaged one is refused in one line."""
    try:
        value = safeio.read_json(path, where=path.name)
    except StudioError as e:
        raise _refuse(folder, str(e), "copy or export the adapter again") from None
    if not isinstance(value, dict):
        raise _refuse(folder, f"{path.name} does not hold a JSON object", "copy or export the adapter again")
    return value


def _read_studio(folder: Path) -> dict:
    """studio.json (empty when there is none), refused when unreadable or of a newer format."""
    studio: dict = {}
    sp = folder / STUDIO_FILE
    if sp.is_file():
        studio = _read_object(folder, sp)
        version = studio.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise _refuse(folder, f"{STUDIO_FILE}: format_version must be an integer (got {str(version)[:40]!r})",
                          "copy or export the adapter again")
        if version > FORMAT_VERSION:
            raise _refuse(folder, f"{STUDIO_FILE} has format version {studio['format_version']}, newer than this "
                                  f"LoRA Studio reads ({FORMAT_VERSION})", "update LoRA Studio")
    return studio


def read_adapter(folder: str | Path) -> AdapterFiles:
    """Read and validate an adapter folder (ours or PEFT's) without touching any model.

    Raises :class:`StudioError` for a folder that is not an adapter, for anything the studio cannot
    represent, and for tensors that do not fit together (a lone A or B, ranks that disagree with the
    config, tensors that are not LoRA matrices of a linear layer).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StudioError(f"adapter {folder}: no such folder", hint="give the folder holding adapter_config.json")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise _refuse(folder, f"no {CONFIG_FILE} in the folder", "choose a folder holding a LoRA adapter")
    cfg = _read_object(folder, cfg_path)
    _check_config(folder, cfg)
    raw = _read_tensors(folder)

    pairs = _lora_pairs(folder, raw)

    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            have, lack = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
            raise _refuse(folder, f"module '{module}' has {have} but no {lack} in {WEIGHTS_FILE}",
                          "the file is incomplete; copy or export the adapter again")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise _refuse(folder, f"module '{module}': lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                  "do not multiply (expected A r × d_in, B d_out × r)",
                          "the file is damaged or not a LoRA adapter")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise _refuse(folder, f"module '{module}': its matrices are {a.dtype}, not floating point",
                          "quantised adapters are not supported")
        r_m = int(_pattern_value(rank_pattern, module, rank))
        if a.shape[0] != r_m:
            raise _refuse(folder, f"module '{module}': lora_A has rank {a.shape[0]} but adapter_config.json "
                                  f"says r={r_m}", "the config and the weights belong to different adapters")
        if not _targets_match(cfg.get("target_modules"), module):
            raise _refuse(folder, f"{WEIGHTS_FILE} has matrices for '{module}', which target_modules "
                                  f"{cfg.get('target_modules')!r} does not select (PEFT would not load them)",
                          "the config and the weights belong to different adapters")
        tensors[module] = (a, b)
        if r_m != rank:
            ranks[module] = r_m
        a_m = float(_pattern_value(alpha_pattern, module, alpha))
        if a_m != alpha:
            alphas[module] = a_m
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a listed target that no tensor belongs to means a lost part
        for t in targets:
            if not any(m == t or m.endswith("." + t) for m in tensors):
                raise _refuse(folder, f"target_modules lists '{t}' but {WEIGHTS_FILE} has no matrices for it",
                              "the file is incomplete; copy or export the adapter again")

    studio = _read_studio(folder)
    dropout = cfg.get("lora_dropout", 0.0) or 0.0
    return AdapterFiles(folder=folder, config=cfg, rank=rank, alpha=alpha, rslora=bool(cfg.get("use_rslora")),
                        dropout=float(dropout), targets=sorted(tensors, key=_natural), tensors=tensors, studio=studio,
                        ranks=ranks, alphas=alphas)


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

