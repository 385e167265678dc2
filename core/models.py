"""Loading a base model, and what it is: config, meta model, device and precision, fingerprint, summary.

Where a model comes from (``--model``: ``default``, a checkpoint folder, a ``.gguf`` file, a repo id in
the local Hugging Face cache) is :mod:`core.model_sources`; a GGUF's one-time conversion into a
safetensors folder is :mod:`core.gguf_convert`; the tokenizer is :mod:`core.tokenizer`; the memory
estimate is :mod:`core.estimate`. Their public names are importable from here too, as they were when
this module held them all.

Safety: weights come only from safetensors or GGUF (core.model_sources refuses pickles); a model whose
config needs its own Python code (``auto_map``) is refused unless ``trust_remote_code`` is passed for
it. Every user-fixable problem is a :class:`~core.errors.StudioError` naming the ``--model`` value and
the file at fault.

Here: :func:`load_config`, :func:`meta_model` (shapes without weights), :func:`load_model`,
:func:`pick_device`, :func:`pick_dtype`, :func:`fingerprint` (is this the same base model?) and
:func:`summary`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from core import safeio
from core.errors import StudioError
from core.gguf_convert import (CONVERSION, SOURCE_FILE, _check_gguf, _conversion_dtype,  # noqa: F401
                               _converted_folder, _converted_folders, _converted_ok, _gguf_header,
                               checkpoint_folder)
from core.model_sources import (BUNDLED_GGUF, BUNDLED_NAME, BUNDLED_PACKAGE, BUNDLED_PIP,  # noqa: F401
                                DEFAULT, KINDS, PICKLE_SUFFIXES, USER_MODELS_FILE, ModelRef, Progress,
                                _check_folder, _first_line, _pickle_error, _say, _weight_files,
                                add_user_model, bundled_gguf, hf_cache_dir, list_models, remove_user_model,
                                resolve)
from core.tokenizer import _ensure_pad_token, _tokenizer_from_folder, load_tokenizer  # noqa: F401


@dataclass
class LoadedModel:
    """A base model ready to carry adapters: frozen, in eval mode, on its device and dtype."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    spec: str
    path: Path
    """The checkpoint folder the weights were read from (the converted cache for a GGUF)."""
    ref: ModelRef | None = None
    quantize: str = "none"
    """How the base's linear layers are held: ``none``, ``nf4``, ``int8`` (``fp4`` for a checkpoint
    stored so), read back from the loaded layers (core.quant.quantization_of)."""
    fingerprint: dict | None = None
    """:func:`fingerprint` of the weights as loaded, taken before any adapter is merged: an fp32
    merge/unmerge cycle leaves W off by fp32 rounding, which would change the content hash, so a
    compatibility check against a long-lived model uses this record (core.library.check_adapter)."""

    @property
    def config(self):
        return self.model.config


# -- config, tokenizer, meta model -----------------------------------------------------------------

def _config_from_folder(ref: ModelRef, folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise StudioError(f"--model {ref.spec}: {folder} has no config.json")
    try:
        raw = safeio.read_json(cfg_path)  # nesting and size capped: transformers parses it again below
    except StudioError as e:
        raise StudioError(f"--model {ref.spec}: {e}") from None
    if not isinstance(raw, dict):
        raise StudioError(f"--model {ref.spec}: {cfg_path} is not a JSON object")
    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map") if isinstance(raw.get("auto_map"), dict) else {}
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not known:
        if auto_map and not trust_remote_code:
            raise StudioError(
                f"--model {ref.spec}: this model needs its own Python code to run ({cfg_path.name} has "
                f"auto_map for model_type '{model_type}'), and LoRA Studio runs a model's code only when "
                "you allow it for that model",
                hint="turn on trust_remote_code for this model only if you trust its authors")
        if not auto_map:
            from transformers import __version__ as tv

            what = f"model_type '{model_type}'" if model_type else "no model_type"
            raise StudioError(
                f"--model {ref.spec}: {cfg_path} says {what}, an architecture transformers {tv} does not know",
                hint="upgrade transformers, or choose another model")
    from core import quant

    quant.checkpoint_quantization(raw, f"--model {ref.spec}: {folder}")  # GPTQ, AWQ, FP8, ...: refused here
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (fields of wrong types: huggingface_hub's strict dataclass errors too)
        raise StudioError(f"--model {ref.spec}: cannot read {cfg_path} ({_first_line(e)})") from None
    return config


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig``, without reading weights.

    For a GGUF that is not converted yet the config comes from the GGUF's metadata (a few seconds);
    once converted, from the cached folder (milliseconds).
    """
    from transformers import AutoConfig

    ref = resolve(spec)
    if ref.kind in ("folder", "hub"):
        return _config_from_folder(ref, ref.path, trust_remote_code)
    folder = _converted_folder(ref.path)
    if _converted_ok(folder):
        return _config_from_folder(ref, folder, False)
    _gguf_header(ref)
    try:
        config = AutoConfig.from_pretrained(ref.path.parent, gguf_file=ref.path.name)
    except Exception as e:  # noqa: BLE001  (metadata of wrong types ends in any error of the config classes)
        raise StudioError(f"--model {ref.spec}: cannot read the configuration in {ref.path.name} "
                          f"({_first_line(e)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config



def _build_on_meta(ref: ModelRef, config, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (absurd config values: KeyError, ZeroDivisionError, TypeError, ...)
        if "Unrecognized configuration class" in str(e):
            raise StudioError(f"--model {ref.spec}: a '{config.model_type}' model is not a causal language "
                              "model (one that writes text); LoRA Studio trains those (Llama, Qwen, "
                              "Mistral, GPT-2, ...)") from None
        raise StudioError(f"--model {ref.spec}: cannot build this model ({_first_line(e)})") from None


def meta_model(spec: str, trust_remote_code: bool = False) -> nn.Module:
    """The model's architecture on the ``meta`` device: names and shapes, no weights read or allocated.
    What the layer tree, ``targets`` and :func:`estimate_memory` work on."""
    return _build_on_meta(resolve(spec), load_config(spec, trust_remote_code), trust_remote_code)


# -- device and precision --------------------------------------------------------------------------

def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else the CPU. ``cuda``, ``cuda:N``, ``mps`` and ``cpu``
    are checked against what this machine (and this torch build) has."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "mps":
        if not _mps_available():
            raise StudioError("--device mps: Apple's Metal (MPS) is not available on this machine",
                              hint="use --device auto or cpu")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if m:
        if not torch.cuda.is_available():
            build = ("a CPU-only torch build" if torch.version.cuda is None
                     else f"torch for CUDA {torch.version.cuda}")
            raise StudioError(f"--device {device}: no CUDA device is available (this is {build})",
                              hint="use --device auto or cpu")
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise StudioError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index) if m.group(1) else torch.device("cuda")
    raise StudioError(f"--device: '{device}' is not one of auto, cpu, cuda, mps")


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _PRECISIONS.items()}.get(dtype, str(dtype).replace("torch.", ""))


def pick_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the frozen base weights are held and computed in. (Adapters stay fp32; see core.lora.)

    ``auto``:
      * CUDA: bf16 where the card supports it (Ampere and later), else fp16 (the trainer then scales
        the loss, as fp16's range is too narrow for small gradients);
      * MPS: fp32. fp16 on MPS needs loss scaling whose support has varied across torch releases, and
        bf16 needs macOS 14; the models this studio targets fit in fp32. Choose fp16 or bf16
        explicitly to halve the weights' memory;
      * CPU: fp32.
    Explicit choices: ``fp32`` anywhere; ``bf16`` on CUDA cards that support it, on MPS, and on the CPU
    (allowed: it halves memory, and CPUs with AVX-512 BF16/AMX run it fast; slower elsewhere);
    ``fp16`` on CUDA and MPS, refused on the CPU (slow there, and no better than bf16 for memory).
    """
    dev = device if isinstance(device, torch.device) else pick_device(str(device))
    p = (precision or "auto").strip().lower()
    if p == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if p not in _PRECISIONS:
        raise StudioError(f"--precision: '{precision}' is not one of auto, fp32, bf16, fp16")
    dtype = _PRECISIONS[p]
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise StudioError(f"--precision bf16: {torch.cuda.get_device_name(dev)} does not support bf16",
                          hint="use --precision fp16 (or auto)")
    if dev.type == "cpu" and dtype == torch.float16:
        raise StudioError("--precision fp16: half precision on the CPU is slow and saves no more memory "
                          "than bf16", hint="use --precision fp32 (or bf16 to halve the weights' memory)")
    return dtype


# -- loading ---------------------------------------------------------------------------------------

def load_model(spec: str, *, device: str = "auto", precision: str = "auto", trust_remote_code: bool = False,
               quantize: str = "none", progress: Progress | None = None) -> LoadedModel:
    """Load a base model for training or generation: weights from safetensors only, frozen
    (``requires_grad`` off everywhere), in eval mode, on ``device`` in ``precision``.

    ``quantize`` (``none``, ``nf4``, ``int8``): hold the base's linear layers in 4 or 8 bits with
    bitsandbytes (core.quant), products in ``precision``. A checkpoint quantised with bitsandbytes
    already loads as it is stored (``none`` or its own method); one quantised any other way is
    refused before any weight is read. ``progress(message, fraction)`` reports the stages (a GGUF's
    first conversion included).
    """
    from core import quant

    ref = resolve(spec)
    method = quant.check_method(quantize)
    dev = pick_device(device)
    dtype = pick_dtype(dev, precision)

    def sub(lo, hi):  # map a sub-job's 0..1 onto lo..hi of this one
        return None if progress is None else (lambda m, f: progress(m, lo + (hi - lo) * f))

    converting = ref.kind in ("default", "gguf") and not _converted_ok(_converted_folder(ref.path))
    folder = checkpoint_folder(spec, progress=sub(0.0, 0.8) if converting else None)
    base = 0.8 if converting else 0.0
    _say(progress, "reading the configuration", base)
    trust = trust_remote_code and ref.kind in ("folder", "hub")
    config = _config_from_folder(ref, folder, trust)  # refuses GPTQ, AWQ, FP8, ... (core.quant)
    stored = _stored_quantization(ref, folder, config, method)
    meta = _build_on_meta(ref, config, trust)  # a clear error for a model that is not a causal LM
    held = stored if stored != "none" else method
    if held != "none":
        quant.bnb(held)  # one line with the pip command when bitsandbytes is missing
        quant.check_layout(meta, held, dev)
    what = precision_name(dtype) + ("" if held == "none" else f", {held}")
    _say(progress, f"loading weights ({what})", base + 0.05 * (1 - base))
    model = _from_pretrained(ref, folder, config, dtype, trust, method if stored == "none" else "none",
                             dev if held != "none" else None)
    model.requires_grad_(False)
    model.eval()
    if held != "none":
        quant.finish_loaded(model, dtype)
    else:
        _say(progress, f"moving to {dev}", base + 0.8 * (1 - base))
        model.to(dev)
    tokenizer = _tokenizer_from_folder(ref, folder, trust)
    _say(progress, "ready", 1.0)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=dtype, spec=spec, path=folder, ref=ref,
                       quantize=quant.quantization_of(model), fingerprint=fingerprint(model))


def _stored_quantization(ref: ModelRef, folder: Path, config, method: str) -> str:
    """How the checkpoint's weights are stored (``none`` or a bitsandbytes method), checked against
    ``--quantize``: a stored 4-bit model cannot become 8-bit (its full-precision weights are gone)."""
    from core import quant

    stored = quant.checkpoint_quantization(config, f"--model {ref.spec}: {folder}")
    if stored != "none" and method not in ("none", stored):
        raise StudioError(f"--quantize {method}: {folder} is already quantised to {stored} with bitsandbytes",
                          hint=f"use --quantize {stored} (or none: it loads as stored), or the model's "
                               "unquantised version")
    return stored


def _from_pretrained(ref: ModelRef, folder: Path, config, dtype: torch.dtype, trust: bool, method: str,
                     device: torch.device | None):
    """transformers' ``from_pretrained`` on the folder; with ``method`` its bitsandbytes integration
    quantises each linear weight as it is read, on ``device`` (``device_map``), which is what a PEFT
    user gets. Measured against loading in the compute dtype and then core.quant.quantize_model (nf4,
    bf16, fresh processes on a 2-core CPU, MALLOC_MMAP_THRESHOLD_ set so freed memory is returned):
    the same logits; the same anonymous-memory peak (87 MiB for a SmolLM2-135M-shaped bf16
    checkpoint, whose bf16 weights are mmapped either way); times within the machine's noise
    (12-17 s both); a tiny checkpoint 0.8-1.0 s against 0.6-0.7 s.
    transformers' way wins where it matters: on a GPU it quantises each tensor on the device, and an
    fp32 checkpoint never exists in full in the compute dtype."""
    from transformers import AutoModelForCausalLM

    from core import quant

    kwargs: dict[str, Any] = {}
    if method != "none":
        kwargs["quantization_config"] = quant.bnb_config(method, dtype)
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust, **kwargs)
    except StudioError:
        raise
    except Exception as e:  # safetensors' and bitsandbytes' errors have no common base class; name the folder
        if method != "none" or device is not None:
            raise StudioError(f"--model {ref.spec}: loading {folder} in 4/8 bits on {device} failed "
                              f"({type(e).__name__}: {_first_line(e)})",
                              hint="use --quantize none, or another --device") from None
        raise StudioError(f"--model {ref.spec}: loading the weights from {folder} failed "
                          f"({type(e).__name__}: {_first_line(e)})",
                          hint="download or copy the model again") from None


# -- fingerprint -----------------------------------------------------------------------------------

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


# -- summary ---------------------------------------------------------------------------------------

def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _folder_dtype(folder: Path) -> str | None:
    """The most common tensor dtype in the checkpoint's first safetensors file (header only)."""
    files = _weight_files(folder)
    if not files:
        return None
    try:
        with open(files[0], "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict):
            counts[v.get("dtype", "?")] = counts.get(v.get("dtype", "?"), 0) + 1
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    return names.get(max(counts, key=counts.get), None) if counts else None


def _folder_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        return bool(cfg.get("chat_template"))
    except (OSError, ValueError):
        return False


def summary(spec: str, trust_remote_code: bool = False) -> dict:
    """What the window's model page and ``models --json`` show, without loading weights.

    Keys: name, kind, spec, path, architecture, model_type, parameters (exact, counted on the meta
    model, a tied embedding once), layers, hidden_size, intermediate_size, attention_heads,
    kv_heads, vocab_size, dtype (as stored: float32/bfloat16/..., or e.g. ``GGUF Q4_1``),
    context_length, chat_template (bool), tied_embeddings (bool), converted (GGUF: cache ready),
    size_bytes.
    """
    from core.targets import count_parameters

    ref = resolve(spec)
    config = load_config(spec, trust_remote_code)
    model = _build_on_meta(ref, config, trust_remote_code and ref.kind in ("folder", "hub"))
    out: dict[str, Any] = {"name": ref.name, "kind": ref.kind, "spec": ref.spec, "path": str(ref.path)}
    archs = getattr(config, "architectures", None) or [type(model).__name__]

    def get(*keys):
        return _cfg(config, *keys)

    out.update({
        "architecture": archs[0], "model_type": config.model_type,
        "parameters": count_parameters(model),
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": get("hidden_size", "n_embd", "d_model"),
        "intermediate_size": get("intermediate_size", "n_inner", "ffn_dim"),
        "attention_heads": get("num_attention_heads", "n_head"),
        "kv_heads": get("num_key_value_heads", "num_attention_heads", "n_head"),
        "vocab_size": get("vocab_size"),
        "context_length": _context_length(config),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    })
    if ref.kind in ("folder", "hub"):
        stored = _folder_dtype(ref.path)
        out["dtype"] = stored or str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        out["chat_template"] = _folder_has_chat_template(ref.path)
        out["size_bytes"] = sum(f.stat().st_size for f in _weight_files(ref.path) if f.is_file())
    else:
        header, metadata = _gguf_header(ref)
        from transformers.integrations.gguf.dequant import GGML_NAME

        types: dict[str, int] = {}
        for t in header.tensors:
            name = GGML_NAME.get(t.ggml_type, {0: "F32", 1: "F16", 30: "BF16"}.get(t.ggml_type, str(t.ggml_type)))
            types[name] = types.get(name, 0) + t.nbytes
        out["dtype"] = "GGUF " + max(types, key=types.get)
        out["chat_template"] = bool(metadata.get("tokenizer.chat_template"))
        out["size_bytes"] = ref.path.stat().st_size
        folder = _converted_folder(ref.path)
        out["converted"] = _converted_ok(folder)
        out["cache"] = str(folder)
    return out


# -- memory estimate: core/estimate.py -------------------------------------------------------------

def _cfg(config, *keys, default=None):
    """The first of ``keys`` that ``config`` has (architectures name the same thing differently)."""
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    return default


_MOVED_TO_ESTIMATE = ("estimate_memory", "ALLOCATOR_ALLOWANCE", "_layer_bytes_per_token", "_estimate")


def __getattr__(name: str):
    """``models.estimate_memory`` and friends, which live in :mod:`core.estimate` now (imported when
    first asked for, so that neither module needs the other to load)."""
    if name in _MOVED_TO_ESTIMATE:
        from core import estimate

        return getattr(estimate, name)
    raise AttributeError(f"module 'core.models' has no attribute {name!r}")
