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

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import safeio
from core.errors import StudioError
from core.fingerprint import fingerprint
from core.gguf_convert import (CONVERSION, SOURCE_FILE, _check_gguf, _conversion_dtype,  # noqa: F401
                               _converted_folder, _converted_folders, _converted_ok, _gguf_header,
                               checkpoint_folder)
from core.model_sources import (BUNDLED_GGUF, BUNDLED_NAME, BUNDLED_PACKAGE, BUNDLED_PIP,  # noqa: F401
                                DEFAULT, KINDS, PICKLE_SUFFIXES, USER_MODELS_FILE, ModelRef, Progress,
                                _check_folder, _first_line, _pickle_error, _say, _weight_files,
                                add_user_model, bundled_gguf, hf_cache_dir, list_models, remove_user_model,
                                resolve)
from core.model_summary import _cfg, _context_length, _folder_dtype, summary  # noqa: F401
from core.tokenizer import _ensure_pad_token, _tokenizer_from_folder, load_tokenizer  # noqa: F401

if TYPE_CHECKING:  # torch is imported when a model is built or a device picked, not with this module
    import torch
    from torch import nn


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
    import torch
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
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else the CPU. ``cuda``, ``cuda:N``, ``mps`` and ``cpu``
    are checked against what this machine (and this torch build) has."""
    import torch

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


_PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``--precision`` → the torch dtype's name (``_PRECISIONS``, built when first asked for: → the dtype)."""


def precision_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return {v: k for k, v in _PRECISION_NAMES.items()}.get(name, name)


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
    import torch

    dev = device if isinstance(device, torch.device) else pick_device(str(device))
    p = (precision or "auto").strip().lower()
    if p == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if p not in _PRECISION_NAMES:
        raise StudioError(f"--precision: '{precision}' is not one of auto, fp32, bf16, fp16")
    dtype = getattr(torch, _PRECISION_NAMES[p])
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

    kwargs: dict[str, Any] = {"output_loading_info": True}
    if method != "none":
        kwargs["quantization_config"] = quant.bnb_config(method, dtype)
    else:  # a weight of another shape is refused below by name, not by transformers' table and error
        kwargs["ignore_mismatched_sizes"] = True
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        with _transformers_quiet():
            model, info = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                               use_safetensors=True, trust_remote_code=trust, **kwargs)
        _check_loading(ref, folder, info)
        return model
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


@contextmanager
def _transformers_quiet():
    """transformers' warnings off for one load: its report of missing or reshaped weights is a
    table on stderr, and the load is checked and refused in one line instead (_check_loading)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _check_loading(ref: ModelRef, folder: Path, info: dict) -> None:
    """Refuse a model some of whose weights were not in the files (transformers then initialises
    them at random and only warns: training would start from noise) or had another shape than the
    config says: config.json and the weights are from different models."""
    missing = sorted(info.get("missing_keys") or ())
    reshaped = sorted(info.get("mismatched_keys") or (), key=lambda m: str(m[0]))
    if not missing and not reshaped:
        return
    if reshaped:
        name, stored, wanted = reshaped[0]
        what = (f"{len(reshaped)} weight{'s' if len(reshaped) != 1 else ''} in the files have another shape "
                f"than its config.json says (first: {name} is {tuple(stored)}, the config makes it {tuple(wanted)})")
    else:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        what = f"{len(missing)} weight{'s' if len(missing) != 1 else ''} its config.json asks for are not in the files ({shown})"
    where = f"--model {ref.spec}" + (f" ({folder})" if str(folder) != str(ref.spec) else "")
    raise StudioError(f"{where}: {what}; the config and the weights are from different models",
                      hint="download or copy the model again, or put the matching config.json beside the weights")


_MOVED_TO_ESTIMATE = ("estimate_memory", "ALLOCATOR_ALLOWANCE", "_layer_bytes_per_token", "_estimate")


def __getattr__(name: str):
    """``models.estimate_memory`` and friends, which live in :mod:`core.estimate` now (imported when
    first asked for, so that neither module needs the other to load), and ``_PRECISIONS``."""
    if name in _MOVED_TO_ESTIMATE:
        from core import estimate

        return getattr(estimate, name)
    if name == "_PRECISIONS":  # core.estimate's: the dtypes, which need torch
        import torch

        return {k: getattr(torch, v) for k, v in _PRECISION_NAMES.items()}
    raise AttributeError(f"module 'core.models' has no attribute {name!r}")
