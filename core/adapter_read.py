"""Reading an adapter folder, and refusing what it cannot be loaded as: the reading half of
:mod:`core.adapter`, with the record both halves share (:class:`AdapterFiles`) and the names of the
files.

Why its own module: an adapter folder is input from anywhere (PEFT, another tool, a damaged copy), so
most of reading is checking. PEFT's ``LoraConfig`` has grown many options that change what an
adapter computes (DoRA, ``modules_to_save``, biases, PiSSA-style base-weight rewrites, aLoRA, ...);
each one LoRALinear cannot express is refused with one :class:`StudioError` that names the folder
and says what to do, and so is a config field of the wrong type, a pickled weights file (never
opened), and tensors that do not fit together or with the config. Reading touches no model: an
adapter is read completely or not at all, and :mod:`core.adapter` then fits it to a model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
import torch

from core import safeio
from core.errors import StudioError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
STUDIO_FILE = "studio.json"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."

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
