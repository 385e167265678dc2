"""The training memory estimate: what one LoRA step needs at its peak, by part
(:func:`estimate_memory`, moved here from ``core/models.py``, which still answers
``models.estimate_memory``), and what *this* run will need (:func:`estimate_for_run`): the estimate
fed with the sequence length the run really pads its batches to.

A batch is padded to its longest example (``core.data.collate``), so the step that needs the most
memory is the one whose batch holds the longest example after truncation; with packing every
sequence is filled up to the maximum length. Before the dataset has been tokenised only the maximum
length is known, and the estimate says that it used it.

Nothing here imports torch until an estimate is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from core.errors import StudioError

if TYPE_CHECKING:  # only for the annotations: torch is imported when an estimate is computed
    import torch
    from torch import nn


def sequence_length(data_cfg, summary: dict | None = None) -> tuple[int, str]:
    """``(tokens, what they are)``: the sequence length the memory estimate should use.

    ``data_cfg`` is the run's :class:`core.config.DataConfig`; ``summary`` what tokenising the dataset
    gave (``max_length`` it was tokenised with, ``path``, and ``stats`` with the ``max`` length after
    truncation, as the Data page computes it), or None. A summary made for another file or another
    maximum length is ignored.
    """
    limit = int(data_cfg.max_length)
    if data_cfg.packing:
        return limit, f"packing: sequences of {limit} tokens"
    longest = _longest(data_cfg, summary)
    if longest is None:
        return limit, "the maximum length (tokenise the dataset to estimate from its lengths)"
    longest = min(longest, limit)
    cut = " after truncation" if longest == limit else ""
    return longest, f"the longest example{cut}"


def _longest(data_cfg, summary: dict | None) -> int | None:
    if not summary or int(summary.get("max_length") or 0) != int(data_cfg.max_length):
        return None
    if data_cfg.path and summary.get("path") and str(summary["path"]) != str(data_cfg.path):
        return None
    stats = summary.get("stats") or {}
    longest = stats.get("max")
    return int(longest) if isinstance(longest, int) and longest > 0 else None


def estimate_for_run(model_config, cfg, summary: dict | None = None, **overrides: Any) -> dict:
    """:func:`core.models.estimate_memory` for the RunConfig ``cfg`` at :func:`sequence_length`;
    the result also carries ``seq_len`` and ``seq_basis`` (what the length is)."""
    seq_len, basis = sequence_length(cfg.data, summary)
    kwargs = dict(batch_size=cfg.train.batch_size, seq_len=seq_len, rank=cfg.lora.rank,
                  targets=cfg.lora.targets, precision=cfg.model.precision, quantize=cfg.model.quantize,
                  gradient_checkpointing=cfg.model.gradient_checkpointing)
    kwargs.update(overrides)
    mem = dict(estimate_memory(model_config, **kwargs))
    mem["seq_len"], mem["seq_basis"] = seq_len, basis
    return mem


def _models():
    from core import models  # at call time: core.models re-exports this module's estimate lazily

    return models


# -- the estimate itself (moved from core/models.py) -------------------------------------------------------------------------------

ALLOCATOR_ALLOWANCE = 0.25
"""Memory an allocator holds beyond the live tensors, as a share of the activations. Activations are
allocated and freed every step in many sizes; glibc's malloc (CPU) and torch's caching allocator
(CUDA) keep some of the freed memory. benchmarks/memory_estimate.py: the live-tensor part of the
estimate is within 7% of the measured live peak, and glibc kept a further 15-45% of the activations
(the most with gradient checkpointing); 0.25 puts every measured setting within 20% of the RSS peak."""

_GELU_TANH_PYTHON = ("gelu_new", "gelu_fast", "gelu_10")
"""Activations transformers computes as a chain of Python ops (0.5·x·(1 + tanh(...))): autograd keeps
four intermediate tensors of the MLP's width instead of one."""


def _need(config, *keys) -> int:
    v = _models()._cfg(config, *keys)
    if not isinstance(v, int) or v < 1:
        raise StudioError(f"memory estimate: this model's configuration ({config.model_type}) has no "
                          f"{' / '.join(keys)}, so its activations cannot be estimated")
    return v


def _dtype_of(precision) -> torch.dtype:
    import torch

    if isinstance(precision, torch.dtype):
        return precision
    p = str(precision).lower()
    if p == "auto":
        return _models().pick_dtype(_models().pick_device("auto"), "auto")
    if p not in _models()._PRECISIONS:
        raise StudioError(f"--precision: '{precision}' is not one of auto, fp32, bf16, fp16")
    return _models()._PRECISIONS[p]


_ROLES_SHARING_INPUT = {"q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"}


def _inputs_kept(kept, h: int, inner: int, s: int) -> int:
    """Bytes per token of the linear layers' inputs that autograd keeps for the modules ``kept``,
    each shared tensor once: q/k/v (and a fused qkv) read the attention norm's output, gate/up the
    MLP norm's, down reads act(gate)·up; o's input is the attention output, counted already."""
    roles = {t.role for t in kept}
    b = 0
    if roles & {"q", "k", "v", "qkv"}:
        b += h * s                                                # the attention norm's output
    if roles & {"gate", "up", "gate_up"}:
        b += h * s                                                # the MLP norm's output
    if "down" in roles:
        b += inner * s                                            # act(gate)·up
    return b + sum(t.d_in * s for t in kept if t.role not in _ROLES_SHARING_INPUT)


def _layer_bytes_per_token(config, chosen, arch_roles: set[str], s: int, rank: int,
                           quantize: str = "none", block: Sequence = ()) -> tuple[int, dict]:
    """Bytes autograd keeps per token for one decoder layer, and what the estimate assumed.

    From what each op saves for backward when the base weights are frozen (measured with
    ``torch.autograd.graph.saved_tensors_hooks`` on Llama- and GPT-2-shaped models; a frozen Linear
    keeps nothing but its weight, which is already counted):

    * each norm keeps its input: fp32 for RMSNorm (transformers computes it in fp32), else the
      model's dtype;
    * attention with separate q/k/v projections keeps q, k and v (k and v repeated to every query
      head, as transformers does for grouped-query attention whenever a padding mask is passed),
      the output (which o_proj's input shares) and a fp32 log-sum-exp per head: flash or
      memory-efficient SDPA, never the T×T probabilities. A fused qkv projection (GPT-2's c_attn)
      keeps its 3h-wide output and two h-wide copies;
    * the MLP keeps the activation's input (four tensors for the Python tanh GELU), and in a gated MLP
      also the activation's output and the up projection (3·I in all for SwiGLU);
    * LoRA on a module keeps the module's input and the r-wide x·Aᵀ, both in the compute dtype
      (core.lora casts the fp32 master A and B to x's dtype for the products), the input shared by
      modules that read the same tensor (:func:`_inputs_kept`);
    * on a quantised base (``quantize``; ``block``: every linear module of one block) the same for
      LoRA; bitsandbytes' 4-bit matmul keeps only its packed weight, its int8 matmul
      (``MatMul8bitFp`` on the CPU, ``MatMul8bitLt`` on CUDA) keeps its input as well, so with int8
      every linear layer's input is kept, adapted or not.
    """
    h = _need(config, "hidden_size", "n_embd", "d_model")
    heads = _need(config, "num_attention_heads", "n_head")
    head_dim = int(_models()._cfg(config, "head_dim", default=h // heads) or h // heads)
    inner = int(_models()._cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
    act = str(_models()._cfg(config, "hidden_act", "activation_function", default="silu"))
    rms = _models()._cfg(config, "rms_norm_eps") is not None
    roles = {t.role for t in chosen}
    gated = bool(arch_roles & {"gate", "gate_up"})  # what the architecture has, targeted or not
    fused = "qkv" in arch_roles
    q_width = heads * head_dim
    b = 2 * h * (4 if rms else s)                                 # the two norms' inputs
    if fused:
        b += 3 * h * s + 2 * h * s + q_width * s                  # c_attn output, copies, output
    else:
        b += 3 * q_width * s + q_width * s                        # q, k, v (repeated), output
    b += heads * 4                                                # log-sum-exp
    b += inner * s * (4 if act in _GELU_TANH_PYTHON else 1)       # the activation's input
    if gated:
        b += 2 * inner * s                                        # act(gate) and up
    b += _inputs_kept(block if quantize == "int8" else chosen, h, inner, s)
    b += s * rank * len(chosen)                                   # x·Aᵀ, in the compute dtype
    return b, {"gated_mlp": gated, "fused_qkv": fused, "rms_norm": rms, "activation": act}


def _weight_bytes(found, params: int, buffers: int, s: int, quantize: str) -> tuple[int, int]:
    """The frozen base's bytes, and the largest quantised layer's dense weight in the compute dtype
    (bitsandbytes de-quantises one layer's weight at a time in the backward pass, and in the CPU
    forward).

    Quantised (core.quant): every linear module but the output head, at
    :data:`core.quant.NF4_BYTES_PER_WEIGHT` (4 bits, an 8-bit absmax per 64 weights and a fp32
    absmax per 256 of those: 4.127 bits) or 1 byte plus a fp32 scale per output row (int8); biases,
    embeddings, norms and the head stay in the compute dtype.
    """
    from core import quant

    weights = params * s + buffers * 4
    if quantize == "none":
        return weights, 0
    layers = [t for t in found if not t.is_head]
    n = sum(t.d_in * t.d_out for t in layers)
    if quantize == "int8":
        packed = n * quant.INT8_BYTES_PER_WEIGHT + sum(t.d_out for t in layers) * quant.INT8_BYTES_PER_ROW
    else:
        packed = n * quant.NF4_BYTES_PER_WEIGHT
    largest = max((t.d_in * t.d_out for t in layers), default=0)
    return int(weights - n * s + packed), largest * s


def _estimate_quantize(config, quantize: str) -> str:
    """``--quantize`` for the estimate; ``none`` on a checkpoint stored in 4/8 bits means as stored."""
    from core import quant

    method = quant.check_method(quantize)
    if method == "none":
        stored = quant.checkpoint_quantization(config, f"memory estimate ({config.model_type})")
        method = "nf4" if stored == "fp4" else stored
    return method


def _chunked_loss(model: nn.Module) -> bool:
    """Whether the trainer's loss goes through the head chunk by chunk for this model (core.loss),
    judged on the meta-device model with its head frozen as training freezes it."""
    head = model.get_output_embeddings()
    if head is not None:
        head.requires_grad_(False)
    return _loss().head_plan(model) is not None


def _loss():
    from core import loss  # imported when needed: core.loss imports core.data

    return loss


def _estimate(config, *, batch_size: int, seq_len: int, rank: int, targets, precision,
              gradient_checkpointing: bool, quantize: str = "none") -> dict:
    import torch

    from core import targets as targets_mod

    if isinstance(config, (str, os.PathLike)):
        config = _models().load_config(str(config))
    if batch_size < 1 or seq_len < 1 or rank < 1:
        raise StudioError("memory estimate: batch size, sequence length and rank must be at least 1")
    dtype = _dtype_of(precision)
    s = torch.finfo(dtype).bits // 8
    quantize = _estimate_quantize(config, quantize)
    models = _models()
    model = models._build_on_meta(models.ModelRef(str(getattr(config, "_name_or_path", "") or config.model_type), "folder",
                                    Path("."), config.model_type), config, False)
    found = targets_mod.list_targets(model)
    names = set(targets_mod.resolve_targets(found, targets))
    chosen = [t for t in found if t.name in names]
    params = targets_mod.count_parameters(model)
    buffers = sum(b.numel() for _, b in model.named_buffers())
    trainable = sum(t.lora_params(rank) for t in chosen)

    layers = _need(config, "num_hidden_layers", "n_layer", "num_layers")
    h = _need(config, "hidden_size", "n_embd", "d_model")
    vocab = _need(config, "vocab_size")
    per_block: dict[str, list] = {}
    for t in chosen:
        if t.block:
            per_block.setdefault(t.block, []).append(t)
    # the busiest block stands for all (selections are usually the same in every block)
    busiest = max(per_block.values(), key=len) if per_block else []
    first = next((t.block for t in found if t.block), None)
    block = [t for t in found if first and t.block == first]      # one block's linear modules
    per_layer, assumed = _layer_bytes_per_token(config, busiest, {t.role for t in found}, s, rank,
                                                quantize, block)
    assumed["quantize"] = quantize
    rms = assumed["rms_norm"]
    tokens = batch_size * seq_len
    final_norm = h * (4 if rms else s)
    mask = seq_len * s                               # the B×T×T padding mask, once per step
    outside = [t for t in chosen if not t.block]     # e.g. an adapted lm_head
    chunked = assumed["chunked_loss"] = not outside and _chunked_loss(model)
    if chunked:  # core.loss: only ∂loss/∂hidden (tokens × d) is kept; a chunk's logits are transient
        head_saved, head_grads = h * s, 0
        head_transient = 3 * _loss().CHUNK_BYTES    # a chunk's logits, their fp32 copy and its softmax
    else:
        head_saved = vocab * (s + 4)                 # the logits, and log-softmax's fp32 output
        head_grads = vocab * 8                       # its gradient and the logits' (backward's first step)
        head_transient = 0
    extra = sum(t.d_in * 4 + rank * 4 for t in outside)
    if gradient_checkpointing:
        kept = layers * h * s + per_layer            # each block's input, and one block recomputed
    else:
        kept = layers * per_layer
    weights, dequantized = _weight_bytes(found, params, buffers, s, quantize)
    activations = tokens * (kept + final_norm + mask + head_saved + extra + max(head_grads, per_layer))
    activations += dequantized + head_transient      # one layer's weight de-quantised (quantised bases)
    adapter = trainable * 4                          # adapters are kept in fp32 (core.lora)
    gradients = trainable * 4
    optimizer = trainable * 8                        # AdamW: exp_avg and exp_avg_sq, fp32
    allocator = ALLOCATOR_ALLOWANCE * activations    # freed activations the allocator keeps
    total = weights + adapter + gradients + optimizer + activations + allocator
    return {"weights": int(weights), "adapter": int(adapter), "gradients": int(gradients),
            "optimizer": int(optimizer), "activations": int(activations), "allocator": int(allocator),
            "total": int(total),
            "trainable_parameters": int(trainable), "parameters": int(params),
            "precision": models.precision_name(dtype), "quantize": quantize, "assumptions": assumed}


def estimate_memory(config, *, batch_size: int, seq_len: int, rank: int,
                    targets: str | Sequence[str] = "all-linear", precision: str | torch.dtype = "fp32",
                    gradient_checkpointing: bool = False, quantize: str = "none") -> dict:
    """Bytes one LoRA training step needs at its peak, by part.

    ``config`` is a ``PretrainedConfig`` (or a model spec). ``weights``: the frozen base in
    ``precision``, its linear layers (not the head) in 4 or 8 bits with ``quantize`` ``nf4``/``int8``
    (:func:`_weight_bytes`; ``none`` on a checkpoint stored by bitsandbytes means as stored);
    ``adapter``, ``gradients`` and ``optimizer`` (AdamW's two states): fp32, 4 + 4 + 8
    bytes per trainable parameter; ``activations``: what autograd keeps for the backward pass
    (:func:`_layer_bytes_per_token` per block, times the blocks, or one block's input each plus one
    recomputed block with ``gradient_checkpointing``), the B×T×T padding mask, the logits and
    log-softmax's fp32 output over the vocabulary, and the gradients that exist at the start of the
    backward pass; ``allocator``: :data:`ALLOCATOR_ALLOWANCE` of the activations, for what the
    allocator keeps of freed blocks. ``total`` is their sum: what the step needs beyond the program
    itself (the Python runtime and the tokenizer on the CPU, the CUDA context on a GPU).

    Assumes padded batches (the worst case), dropout off in the base model, and a batch of
    ``batch_size`` sequences of ``seq_len`` tokens. benchmarks/memory_estimate.py compares it with
    real steps of the bundled default on the CPU (benchmarks/results/memory_estimate-cpu.json):
    fp32 within 0.4% of the RSS peak without gradient checkpointing and 23% under it with; nf4 and
    int8 bases in fp32 3.5-6% under; nf4 in bf16 15.5% under (22.6% under the live peak: the bf16
    logits are widened to fp32 by the loss, a term left to the chunked loss that replaces it).
    """
    return _estimate(config, batch_size=batch_size, seq_len=seq_len, rank=rank, targets=targets,
                     precision=precision, gradient_checkpointing=gradient_checkpointing, quantize=quantize)
