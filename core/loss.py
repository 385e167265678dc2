"""The training loss without the full logits: next-token cross-entropy, chunk by chunk, through the
output head.

Why
    ``model(...).logits`` is a ``tokens × vocabulary`` tensor: 2048 tokens of SmolLM2 (49 152 words)
    are 400 MB in fp32, and the plain loss keeps it several times over (the logits, their fp32 copy,
    log-softmax saved for the backward, then its gradient and the logits' gradient), which for a
    135M model at 2k tokens is more than the rest of the step. Here the final hidden states
    (``tokens × d``, after the model's final norm) go through the head a chunk of tokens at a time:
    the forward computes each chunk's logits, its loss and at once its gradient with respect to the
    hidden chunk, ``(softmax − onehot) · W``, and keeps only that gradient (``tokens × d``, the
    hidden states' dtype); the backward multiplies it by the incoming scalar. This is the approach of
    Liger Kernel's fused linear cross-entropy and Unsloth, for a frozen head (LoRA never trains it).

    Kept alive between forward and backward: ``d × element size`` bytes per trained token (2304 for
    SmolLM2 in fp32), against ``≥ 2 × 4 × vocabulary`` (393 216) for the plain path; the chunk's own
    buffers (two of :data:`CHUNK_BYTES`) are transient.

What it supports
    :func:`loss_sum` takes the model and a batch as the trainer has them and picks the path: the
    chunked one for a model class whose forward is known to do nothing between the head and the loss
    but what :data:`_LOGIT_TRANSFORMS` says (Gemma 2/3's tanh soft-cap, Granite's divisor, Cohere's
    multiplier), whose head is a plain, frozen ``nn.Linear``; the plain one (``model(...).logits``,
    then ``F.cross_entropy``) for anything else: a class not listed (remote code, a new family), a
    head under LoRA or trained, a quantised head, a DistributedDataParallel wrapper (its forward
    hooks must see the call). Both return the same fp32 sum over the trained tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.encoded import IGNORE  # the label of a token that is not trained

# One chunk's fp32 logits: 96 MiB is 512 tokens of a 49k vocabulary (SmolLM2), 196 of a 128k one
# (Llama 3). Smaller chunks make the head's two products thinner GEMMs that stream the whole head
# weight once per chunk; measured on the 2-core CPU (SmolLM2's head, 2048 tokens, forward + backward,
# CPU time against the plain loss): 170 tokens 1.10x, 256 1.02x, 341 0.99x, 512 0.92x, 1024 0.87x.
# 512 is the smallest that is clearly no slower, and its transient (the logits and their
# log-softmax, 2 x 96 MiB) is a sixth of what the plain loss holds at 2048 tokens.
CHUNK_BYTES = 96 * 2**20

# transformers' causal-LM classes whose forward is `logits = lm_head(base(...).last_hidden_state)`
# followed by nothing, or by the transform named here, before the loss (read in transformers 5.24;
# tests/test_loss.py checks every one against `model(labels=...).loss`).
_PLAIN = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
          "Phi3ForCausalLM", "PhiForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GemmaForCausalLM",
          "Olmo2ForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "SmolLM3ForCausalLM")
_LOGIT_TRANSFORMS = {
    **{name: None for name in _PLAIN},
    "Gemma2ForCausalLM": "softcap",    # logits = c · tanh(logits / c), c = config.final_logit_softcapping
    "Gemma3ForCausalLM": "softcap",
    "GraniteForCausalLM": "divide",    # logits / config.logits_scaling
    "CohereForCausalLM": "multiply",   # logits · model.logit_scale
    "Cohere2ForCausalLM": "multiply",
}


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is token t+1: shift the labels, not the logits (the last has none)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's fp32 logits take about ``budget`` bytes."""
    return max(1, budget // (4 * vocab))


# -- the chunked function --------------------------------------------------------------------------
def _chunk(h, y, weight, bias, scale: float, softcap: float | None, want_grad: bool):
    """Loss sum of one chunk (fp32 scalar) and, if asked, its gradient w.r.t. ``h`` (h's dtype).

    h: (n, d); y: (n,) with IGNORE; weight: (V, d). The logits are computed in the head's dtype, as
    the model does, and upcast once. ``log_softmax`` is the fused kernel ``F.cross_entropy`` uses (so
    the values are the plain path's), and its output becomes the softmax in place. Ignored tokens
    are zeroed in the (n, d) product rather than in the (n, V) softmax: a pass over d, not V.
    """
    z = F.linear(h, weight, bias).float()  # for an fp32 head .float() is the same tensor: no copy
    if scale != 1.0:
        z.mul_(scale)
    deriv = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        if want_grad:
            deriv = 1.0 - z * z  # d(c·tanh(x/c))/dx
        z.mul_(softcap)
    logp = torch.log_softmax(z, dim=-1)
    del z
    valid = y != IGNORE
    y0 = y.clamp(min=0)[:, None]
    loss = -torch.where(valid, logp.gather(1, y0).squeeze(1), 0.0).sum()
    if not want_grad:
        return loss, None
    g = logp.exp_().scatter_add_(1, y0, torch.full(y0.shape, -1.0, device=y0.device))  # softmax − onehot
    if deriv is not None:
        g.mul_(deriv)
    if scale != 1.0:
        g.mul_(scale)
    return loss, (g.to(weight.dtype) @ weight).masked_fill_(~valid[:, None], 0).to(h.dtype)


def _run_chunks(hidden, weight, bias, labels, scale, softcap, rows, want_grad):
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    for s in range(0, hidden.shape[0], rows):
        loss, g = _chunk(hidden[s:s + rows], labels[s:s + rows], weight, bias, scale, softcap, want_grad)
        total += loss
        if want_grad:
            grad[s:s + rows] = g
    return total, grad


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy of ``linear(hidden, weight, bias)``; the gradient flows to ``hidden`` only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, softcap, rows):
        total, grad = _run_chunks(hidden, weight, bias, labels, scale, softcap, rows, want_grad=True)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # in fp32: the incoming scalar (1 / trained tokens) rounded to bf16 would bias every entry
        scaled = grad * grad_out if grad.dtype == grad_out.dtype else (grad.float() * grad_out).to(grad.dtype)
        return scaled, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, scale: float = 1.0, softcap: float | None = None,
                          chunk: int | None = None) -> torch.Tensor:
    """Σ over tokens whose label is not IGNORE of ``cross_entropy(t(hidden @ weightᵀ + bias), label)``
    in fp32, where ``t`` multiplies by ``scale`` then soft-caps (``c · tanh(x / c)``) when ``softcap``
    is set. hidden: (N, d); weight: (V, d), frozen; labels: (N,), already shifted. ``chunk`` tokens at
    a time (default: :func:`chunk_rows`). Without grad mode or a hidden that needs a gradient, only
    the loss is computed."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("chunked_cross_entropy gives no gradient to the head: use the plain loss for a trained head")
    rows = chunk or chunk_rows(weight.shape[0])
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _ChunkedCrossEntropy.apply(hidden, weight, bias, labels, float(scale), softcap, rows)
    return _run_chunks(hidden, weight, bias, labels, float(scale), softcap, rows, want_grad=False)[0]


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class HeadPlan:
    """How to reach the final hidden states and what the head does after them."""

    base: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float = 1.0
    softcap: float | None = None


def head_plan(model: nn.Module) -> HeadPlan | None:
    """The chunked path for ``model``, or None where only the plain path is known to be right."""
    cls = type(model)
    if cls.__name__ not in _LOGIT_TRANSFORMS or not cls.__module__.startswith("transformers.models."):
        return None  # an unknown forward (remote code, a subclass, a wrapper such as DDP)
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or hasattr(head, "_hf_hook") or head._forward_hooks or head._forward_pre_hooks:
        return None  # LoRA on the head, a quantised head, or hooks that expect to see the call
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None  # a trained head needs its own gradient, which the chunked function does not give
    base = getattr(model, model.base_model_prefix, None)
    if not isinstance(base, nn.Module) or base is model:
        return None
    plan = HeadPlan(base, head.weight, head.bias)
    kind = _LOGIT_TRANSFORMS[cls.__name__]
    if kind == "softcap":
        plan.softcap = getattr(model.config, "final_logit_softcapping", None)
    elif kind == "divide":
        plan.scale = 1.0 / float(model.config.logits_scaling)
    elif kind == "multiply":
        plan.scale = float(model.logit_scale)
    return plan


PACKED_ATTENTION = ("auto", "positions", "block")
"""How a packed batch's examples are kept apart (see :func:`model_inputs`)."""


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model itself, also under DistributedDataParallel (whose config and class are the inner one's)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _masks_packed_sequences(model: nn.Module) -> bool:
    """Whether ``model`` builds its attention mask with transformers' masking_utils (its modeling
    module calls ``create_causal_mask``) for an attention it knows: given position ids and no 2-D
    mask, that finds packed sequences where a position does not follow the one before
    (``find_packed_sequence_indices``) and keeps attention inside each; flash attention takes
    the same position ids as variable-length sequences."""
    inner = _unwrapped(model)
    modeling = sys.modules.get(type(inner).__module__)
    if not any(hasattr(modeling, f) for f in ("create_causal_mask", "create_sliding_window_causal_mask")):
        return False
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return getattr(getattr(inner, "config", None), "_attn_implementation", None) in ALL_MASK_ATTENTION_FUNCTIONS


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(batch, 1, L, L): query q sees key k when k <= q inside the same segment, a segment starting
    wherever a position does not follow the previous one (as in core.packing.collate). Boolean
    (True: attend), or additive in ``dtype`` (0 / the dtype's minimum) for an eager attention."""
    step = position_ids[:, 1:] - position_ids[:, :-1]
    segment = F.pad((step != 1).cumsum(-1), (1, 0))
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril_()
    allowed = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                         torch.finfo(dtype).min)


def model_inputs(model: nn.Module, batch: dict, packed_attention: str = "auto") -> dict:
    """What the trainer's forward passes: the ids, no cache, and the attention.

    A plain batch gives its padding mask. A packed batch (it has ``position_ids``, see core.packing)
    gives the position ids, and keeps each example's attention to itself: ``"positions"`` leaves the
    2-D mask out so transformers builds the packed-sequence mask from the position ids (its padding
    is a segment of its own, so no mask is lost); ``"block"`` gives a 4-D block-diagonal causal mask
    of our own, which the model's attention takes as it is; ``"auto"`` is ``"positions"`` where
    :func:`_masks_packed_sequences` says the model reads them, else ``"block"``.
    """
    kw = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" not in batch:
        kw["attention_mask"] = batch["attention_mask"]
        return kw
    if packed_attention not in PACKED_ATTENTION:
        raise ValueError(f"packed_attention must be one of {PACKED_ATTENTION}, not {packed_attention!r}")
    kw["position_ids"] = batch["position_ids"]
    if packed_attention == "auto":
        packed_attention = "positions" if _masks_packed_sequences(model) else "block"
    if packed_attention == "positions":
        kw["attention_mask"] = None
    else:
        inner = _unwrapped(model)
        eager = getattr(getattr(inner, "config", None), "_attn_implementation", None) == "eager"
        dtype = getattr(inner, "dtype", torch.float32) if eager else None
        kw["attention_mask"] = block_causal_mask(batch["position_ids"], dtype)
    return kw


def plain_loss_sum(model: nn.Module, batch: dict, *, packed_attention: str = "auto") -> torch.Tensor:
    """The textbook path: the full logits, upcast, ``F.cross_entropy`` summed over trained tokens."""
    logits = model(**model_inputs(model, batch, packed_attention)).logits
    labels = shifted_labels(batch["labels"])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def loss_sum(model: nn.Module, batch: dict, *, chunk: int | None = None,
             select_rows: bool | None = None, packed_attention: str = "auto") -> torch.Tensor:
    """Σ of next-token cross-entropies over the batch's trained tokens (fp32 scalar), chunked through
    the head where :func:`head_plan` allows, else :func:`plain_loss_sum`.

    ``select_rows`` (default: on the CPU only): only the trained tokens' hidden states go through the
    head, so prompts and padding cost no head product. Finding them needs their count on the host,
    which on an accelerator is a sync that stalls the queued work; there every token goes through
    and the ignored ones are masked inside the chunks. ``packed_attention``: see :func:`model_inputs`.
    """
    plan = head_plan(model)
    if plan is None:
        return plain_loss_sum(model, batch, packed_attention=packed_attention)
    labels = shifted_labels(batch["labels"]).reshape(-1)
    if select_rows is None:
        select_rows = labels.device.type == "cpu"
    rows = (labels != IGNORE).nonzero().squeeze(1) if select_rows else None  # before the forward is queued
    hidden = plan.base(**model_inputs(plan.base, batch, packed_attention)).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if rows is not None:
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    return chunked_cross_entropy(hidden, plan.weight, labels, bias=plan.bias, scale=plan.scale,
                                 softcap=plan.softcap, chunk=chunk)
