"""4-bit and 8-bit base models (QLoRA) with bitsandbytes.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) keeps the frozen base's linear layers in 4-bit NF4
and trains fp32 LoRA matrices beside them: a 7B base needs ~4 GB instead of 14. We use bitsandbytes,
the library PEFT and transformers use (``BitsAndBytesConfig``), so a base quantised here is the same
base a PEFT user gets, and an adapter trained on it is a plain PEFT adapter. bitsandbytes 0.50 runs
NF4 and int8 on the CPU as well as on CUDA.

What is quantised: every ``nn.Linear`` (and GPT-2's ``Conv1D``) of the base except the output head
(``model.get_output_embeddings()``, which is often tied to the input embedding and is the most
sensitive matrix); embeddings, norms and the head stay in the compute dtype. That is transformers'
own choice for ``load_in_4bit`` as well.

* ``nf4``: ``bnb.nn.Linear4bit``, NormalFloat-4 with double quantisation (QLoRA's settings: one
  absmax per 64 weights, themselves quantised to 8 bits in blocks of 256); products in the run's
  precision (``compute_dtype``).
* ``int8``: ``bnb.nn.Linear8bitLt`` (LLM.int8(): int8 weights with one fp32 scale per output row,
  ``has_fp16_weights=False``, outlier threshold 6.0).

bitsandbytes is imported only when a method other than ``none`` is asked for, so the rest of the
studio runs without it. Its CPU inference fast path is switched off on every 4-bit layer (see
:func:`_keep_canonical_layout`): it repacks the weight on the first no-grad forward in eval mode,
rounding the absmax to bf16 (the weights change) and leaving a layout whose later training forward
gives the input no gradient.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

import torch
from torch import nn

from core.config import QUANTIZE  # what --quantize accepts (ModelConfig validates against it too)
from core.config import QUANTIZE_PIP as PIP
from core.errors import StudioError

NF4_BLOCK = 64
"""Weights per absmax in NF4 (bitsandbytes' and QLoRA's default)."""
NF4_BLOCK2 = 256
"""absmax values per second-level block with double quantisation."""

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_BLOCK2)
"""Bytes one NF4 weight costs with double quantisation: 4 bits, plus an 8-bit absmax per 64
weights, plus a fp32 absmax per 256 of those (0.5159 bytes: 4.127 bits). Without double
quantisation it would be 0.5 + 4/64 = 0.5625."""
INT8_BYTES_PER_WEIGHT = 1.0
INT8_BYTES_PER_ROW = 4
"""int8: one byte a weight and one fp32 scale (SCB) per output row."""

_QUIET = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions", "bitsandbytes.cextension")
"""Loggers that warn on import (an optional 'kernels' package is missing) or on every int8 forward
(inputs cast to fp16): neither is the user's to act on, and the second floods the terminal."""


def check_method(method: Any, option: str = "--quantize") -> str:
    """``method`` as one of :data:`QUANTIZE`, or one StudioError naming the option."""
    m = "none" if method is None else str(method).strip().lower()
    if m not in QUANTIZE:
        raise StudioError(f"{option}: '{method}' is not one of {', '.join(QUANTIZE)}")
    return m


def available() -> bool:
    """Whether bitsandbytes is installed (found, not imported: cheap enough for a window)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def bnb(method: str = "nf4"):
    """The imported bitsandbytes, or one StudioError saying how to install it."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    if not available():
        raise StudioError(f"--quantize {method}: bitsandbytes is not installed (it holds the base model's "
                          "layers in 4 or 8 bits)", hint=f"run '{PIP}', or use --quantize none")
    try:
        import bitsandbytes
    except Exception as e:  # a broken install fails in many ways (missing native library, ...)
        text = str(e).strip().splitlines()
        raise StudioError(f"--quantize {method}: bitsandbytes is installed but cannot be imported "
                          f"({text[0] if text else type(e).__name__})",
                          hint=f"reinstall it with '{PIP} --force-reinstall', or use --quantize none") from None
    return bitsandbytes


# -- finding quantised layers ----------------------------------------------------------------------

def _bnb_loaded():
    """bitsandbytes if some code imported it already, else None (then no layer can be quantised)."""
    return sys.modules.get("bitsandbytes")


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (never imports it)."""
    lib = _bnb_loaded()
    return lib is not None and isinstance(module, (lib.nn.Linear4bit, lib.nn.Linear8bitLt))


def layer_method(module: nn.Module) -> str:
    """``nf4`` (or ``fp4``) for a 4-bit layer, ``int8`` for an 8-bit one, ``none`` otherwise."""
    if not is_quantized_layer(module):
        return "none"
    lib = _bnb_loaded()
    if isinstance(module, lib.nn.Linear4bit):
        return str(getattr(module.weight, "quant_type", None) or module.quant_type or "nf4")
    return "int8"


def quantization_of(model: nn.Module) -> str:
    """``nf4``, ``int8`` (``fp4`` for such a checkpoint) or ``none``: how the base's layers are held.
    The first quantised layer decides (a model is quantised one way throughout)."""
    if _bnb_loaded() is None:
        return "none"
    for m in model.modules():
        method = layer_method(m)
        if method != "none":
            return method
    return "none"


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's shape as the model sees it: a packed 4-bit weight is stored as ``(n/2, 1)``
    bytes, its ``quant_state`` knows the real ``(d_out, d_in)``."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return tuple(int(d) for d in qs.shape)
    return tuple(p.shape)


def stored_transposed(module: nn.Module) -> bool:
    """Whether a quantised layer replaced a ``Conv1D`` (whose weight is stored d_in × d_out), so the
    unquantised model's weight is the transpose of :func:`dequantized_weight`."""
    conv1d = _conv1d_type()
    src = getattr(module, "source_cls", None)
    return bool(conv1d) and isinstance(src, type) and issubclass(src, conv1d)


# -- dense weights back ----------------------------------------------------------------------------

def _canonical_4bit(module: nn.Module):
    """The layer's packed weight and quant state in bitsandbytes' canonical layout (undoing the CPU
    inference repacking, as bitsandbytes itself does before saving)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        module.quant_state = w.quant_state
    return w.data, w.quant_state


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight (d_out × d_in) a bitsandbytes layer computes with, in ``dtype``.

    4-bit: ``bitsandbytes.functional.dequantize_4bit``. int8: ``CB · SCB / 127`` per row, the
    expression bitsandbytes' own backward (and CPU training forward) uses. What merging, export and
    the ΔW analysis need from a quantised base.
    """
    lib = _bnb_loaded()
    if lib is None or not is_quantized_layer(module):
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantised layer")
    if isinstance(module, lib.nn.Linear4bit):
        from bitsandbytes.functional import dequantize_4bit

        data, state = _canonical_4bit(module)
        return dequantize_4bit(data, state).to(dtype)
    state = module.state
    cb = state.CB if state.CB is not None else getattr(module.weight, "CB", None)
    scb = state.SCB if state.SCB is not None else getattr(module.weight, "SCB", None)
    if cb is None:  # neither holds them (a layer read from a checkpoint): the int8 values are the data
        cb = module.weight.data
    if scb is None:
        raise RuntimeError("this int8 layer holds no scales (SCB): it was never quantised")
    return cb.to(dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


# -- quantising a loaded model ---------------------------------------------------------------------

def _keep_canonical_layout(model: nn.Module) -> None:
    """Switch off bitsandbytes' CPU inference repacking on every 4-bit layer (see the module doc)."""
    lib = _bnb_loaded()
    if lib is None:
        return
    for m in model.modules():
        if isinstance(m, lib.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Conv1D


def _replaceable(model: nn.Module) -> list[str]:
    """Names of every plain ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's transposed linear
    layer, as transformers' own bitsandbytes integration does) but the output head. Names, not
    modules: holding the modules would keep every original weight alive until the end."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    conv1d = _conv1d_type()
    return [n for n, m in model.named_modules()
            if (type(m) is nn.Linear or (conv1d and type(m) is conv1d)) and m is not head]


def _input_width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else int(layer.weight.shape[0])


def check_layout(model: nn.Module, method: str, device: torch.device | str) -> None:
    """Refuse nf4 on the CPU for a model with a layer whose input width is not a multiple of 64.

    bitsandbytes 0.50.2's CPU kernel de-quantises such a layer wrongly (it reads the 64-weight blocks
    row by row; measured: 40% error on a 64 × 32 weight instead of NF4's 9%), in the forward pass and
    in ``dequantize_4bit`` alike; its CUDA kernels and its int8 are right. Every released model's
    widths are multiples of 64, so this only stops a toy model (or a pruned one) from training on
    garbage. Works on a meta model, so it runs before any weight is read.
    """
    if method not in ("nf4", "fp4") or torch.device(device).type != "cpu":
        return
    odd = [(n, _input_width(model.get_submodule(n))) for n in _replaceable(model)]
    odd = [(n, w) for n, w in odd if w % NF4_BLOCK]
    if odd:
        name, width = odd[0]
        raise StudioError(
            f"--quantize {method}: {len(odd)} linear layer(s) of this model take inputs {width} wide (e.g. "
            f"'{name}'), not a multiple of {NF4_BLOCK}, which bitsandbytes' CPU kernel de-quantises wrongly",
            hint="use --quantize int8, or train on a CUDA GPU")


def _quantized_copy(lib, layer: nn.Module, method: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding ``layer``'s weight, quantised on the weight's device."""
    device = layer.weight.device
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        weight, d_in, d_out = layer.weight.data, layer.in_features, layer.out_features
    else:  # Conv1D keeps W as (d_in, d_out): y = x·W + b
        weight = layer.weight.data.t().contiguous()
        d_out, d_in = weight.shape
    if method == "nf4":
        new = lib.nn.Linear4bit(d_in, d_out, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = lib.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", blocksize=NF4_BLOCK, module=new)
    else:
        new = lib.nn.Linear8bitLt(d_in, d_out, bias=has_bias, has_fp16_weights=False, threshold=6.0,
                                  device="meta")
        new.weight = lib.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    new.source_cls = type(layer)  # as transformers marks it: a Conv1D's weight was transposed
    new.to(device)  # quantises the weight (bitsandbytes quantises when a weight reaches its device)
    new.train(layer.training)
    return new


def quantize_model(model: nn.Module, method: str, compute_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace the base's ``nn.Linear`` layers (not the output head, not embeddings) in place with
    bitsandbytes layers; return the replaced modules' names.

    ``compute_dtype`` is the dtype of the products (the run's precision). Bias and device are kept;
    each original weight is freed as soon as its layer is replaced, so the peak is the model plus one
    layer. The model is marked as transformers marks a model it loaded in 4/8 bits
    (``is_loaded_in_4bit``/``is_loaded_in_8bit``), which is what PEFT reads to wrap such layers.
    """
    method = check_method(method)
    if method == "none":
        return []
    lib = bnb(method)
    first = next(iter(_replaceable(model)), None)
    if first is not None:
        check_layout(model, method, model.get_submodule(first).weight.device)
    done = []
    for name in _replaceable(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        try:
            new = _quantized_copy(lib, layer, method, compute_dtype)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            text = str(e).strip().splitlines()
            raise StudioError(f"--quantize {method}: bitsandbytes cannot quantise '{name}' on "
                              f"{layer.weight.device} ({text[0] if text else type(e).__name__})",
                              hint="use --quantize none, or another --device") from None
        setattr(parent, child, new)
        del layer, new  # the original weight goes now, not at the end
        done.append(name)
    _keep_canonical_layout(model)
    if done:
        model.is_loaded_in_4bit = method == "nf4"
        model.is_loaded_in_8bit = method == "int8"
    return done


# -- checkpoints that are quantised already --------------------------------------------------------

def _as_dict(qc: Any) -> dict:
    if isinstance(qc, dict):
        return qc
    if hasattr(qc, "to_dict"):
        return qc.to_dict()
    return dict(vars(qc)) if hasattr(qc, "__dict__") else {}


def checkpoint_quantization(config: Any, where: str) -> str:
    """How a checkpoint's weights are stored, from its config (a ``PretrainedConfig`` or config.json's
    dict): ``none``, or ``nf4``/``fp4``/``int8`` for a bitsandbytes checkpoint, which loads as such.

    Any other ``quantization_config`` (GPTQ, AWQ, FP8, compressed-tensors, HQQ, EETQ, torchao, AQLM,
    Quanto, BitNet, ...) is refused here with one StudioError naming the method, before any weight is
    read: those layers are not ones LoRA Studio's engine wraps, and dequantising them is the job of
    the tool that wrote them. ``where`` names the model in the message (``--model X: path``).
    """
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if not qc:
        return "none"
    d = _as_dict(qc)
    method = str(d.get("quant_method") or "unknown").lower()
    if method == "bitsandbytes":
        if d.get("load_in_4bit") or d.get("_load_in_4bit"):
            return str(d.get("bnb_4bit_quant_type") or "fp4").lower()
        if d.get("load_in_8bit") or d.get("_load_in_8bit"):
            return "int8"
    raise StudioError(
        f"{where}: the checkpoint is quantised with {method} (config.json's quantization_config), which "
        "LoRA Studio cannot train on or load; it reads full-precision checkpoints (fp32, bf16, fp16) "
        "and bitsandbytes 4-bit/8-bit ones",
        hint="use the model's unquantised version; for a small base in memory add --quantize nf4 (4-bit, QLoRA)")


def bnb_config(method: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` with the settings :func:`quantize_model` uses."""
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False)


def finish_loaded(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """After transformers loaded a bitsandbytes model: 4-bit products in the run's precision (a
    stored checkpoint names its own compute dtype) and the CPU repacking switched off."""
    lib = _bnb_loaded()
    if lib is None:
        return
    for m in model.modules():
        if isinstance(m, lib.nn.Linear4bit):
            m.compute_dtype = compute_dtype
            m.compute_type_is_set = True
    _keep_canonical_layout(model)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every bitsandbytes layer in place with a plain ``nn.Linear`` (or the ``Conv1D`` it
    came from) holding its de-quantised weight in ``dtype``; return the replaced names.

    What a merged export of a QLoRA run merges into: the adapter learned its update against the
    de-quantised 4-bit (or 8-bit) weights, not the full-precision ones they came from.
    """
    replaced = []
    conv1d = _conv1d_type()
    for name, layer in list(model.named_modules()):
        if not is_quantized_layer(layer):
            continue
        w = dequantized_weight(layer, dtype)
        d_out, d_in = w.shape
        if conv1d and getattr(layer, "source_cls", None) is conv1d:
            plain = conv1d(d_out, d_in)
            plain.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        else:
            plain = nn.Linear(d_in, d_out, bias=layer.bias is not None, device="meta")
            plain.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
        replaced.append(name)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return replaced
