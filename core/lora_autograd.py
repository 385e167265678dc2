"""The autograd functions behind a LoRA layer's fast path, and the group that runs sibling layers
fed the same input (q/k/v, gate/up) as one of them.

Autograd on the textbook expression ``base(x) + s·B·A·x`` keeps the right tensors but runs extra
elementwise passes over the (tokens × d_out) activations; these functions write the backward by hand,
accumulating the LoRA branch into the base output and the base input gradient in place, and keeping
the adapter in fp32 (master weights) while the products run in the compute dtype. Measured and
explained in benchmarks/README.md.

Apart from core.lora because they are the one part of the layer that is about autograd rather than
adapters: :class:`core.lora.LoRALinear` decides *whether* a call can take the fast path (one active,
unmerged adapter, no dropout, a frozen base in x's dtype: its ``_fused``) and these compute it:

* :class:`_LoRAFunction`: one layer, ``base(x) + s·(x·Aᵀ)·Bᵀ``;
* :class:`_LoRAAddFunction`: the same added to an output we cannot compute ourselves (a bitsandbytes
  4-bit or 8-bit base layer);
* :class:`_GroupFunction`: several layers that read the same x, as one node, run by the layers'
  :class:`_SharedInput` (which core.lora gives siblings by name and which checks, call by call, that
  they really were given the same tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _base_out(x2, w, bias, transposed):
    """The frozen layer's output for 2-D input: x·Wᵀ + b, or x·W + b for Conv1D (W is d_in × d_out)."""
    if transposed:
        return torch.addmm(bias, x2, w) if bias is not None else x2 @ w
    return F.linear(x2, w, bias)


def _unviewed(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` (a tensor made inside a forward) reshaped to ``shape`` without becoming a view: autograd
    forbids in-place changes to a view a custom Function returns, and models do change a projection's
    output in place (Falcon's ``mlp_output += attention_output``). ``_unsafe_view`` is how torch's own
    ops return a reshaped result that owns its storage; a copy would cost a pass over the output."""
    return torch.ops.aten._unsafe_view(t, shape)


class _LoRAFunction(torch.autograd.Function):
    """base(x) + s·(x·Aᵀ)·Bᵀ with a hand-written backward.

    Autograd on the plain expression keeps the same tensors but runs extra elementwise passes over
    the (tokens × d_out) activations: the scale multiply and the sum of the two output branches in
    the forward, and the scale multiply and the sum of the two input-gradient branches in the
    backward. Here the LoRA branch is accumulated into the base output and into the base input
    gradient in place with ``addmm_`` (alpha = s), so each of those passes disappears. Only ``x``
    (which the caller holds anyway) and the r-wide ``A·xᵀ`` are saved; the frozen weight gets no
    gradient (it is never asked for), and nothing is computed for an input that needs none.

    The r-wide products are computed with r as the *row* count of the result (``A·xᵀ`` is r × N,
    ``Bᵀ·gᵀ`` is r × N, ``(A·xᵀ)·g`` is r × d_out), not as N × r. The tensors are the same up to a
    transpose, but a GEMM whose output has only r = 8 columns runs about 1.5-2.5× slower on a
    CPU than the same GEMM with r rows (measured, one thread, N = 512, d = 576: x·Aᵀ 90-125 µs
    vs A·xᵀ 50-70 µs; gᵀ·xa 125-160 µs vs (xaᵀ·g)ᵀ 50-60 µs). See benchmarks/README.md.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, transposed: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = _base_out(x2, weight, bias, transposed)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # fp32 master weights → the compute dtype
        xa_t = a @ x2.t()  # (r, N): A·xᵀ, r rows (see the class docstring)
        out.addmm_(xa_t.t(), b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, xa_t)
        ctx.scaling = scaling
        ctx.transposed = transposed
        ctx.shape = shape
        ctx.master = lora_a.dtype
        return _unviewed(out, (*shape[:-1], out.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_a, lora_b, xa_t = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, d_out)
        needs = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        # Every product that reads g runs back to back, while g is still in cache: on a CPU these
        # r-wide GEMMs are bound by memory traffic, not arithmetic (benchmarks/README.md).
        # (r, N): the gradient reaching the middle of B·A, transposed and not yet scaled by s; Bᵀ
        # made contiguous (r × d_out, a tiny copy) so the GEMM reads it row by row.
        gb_t = lora_b.t().contiguous() @ g.t() if (needs[0] or needs[3]) else None
        if needs[4]:  # (r, d_out) computed, returned as (d_out, r); s applied inside the GEMM
            grad_b = torch.addmm(_zero(g), xa_t, g, beta=0, alpha=s).t()
        if needs[0]:
            grad_x = g @ (weight.t() if ctx.transposed else weight)
            grad_x.addmm_(gb_t.t(), lora_a, alpha=s)
            grad_x = grad_x.reshape(ctx.shape)
        if needs[3]:
            grad_a = torch.addmm(_zero(g), gb_t, x2, beta=0, alpha=s)  # (r, d_in)
        return grad_x, None, None, _master(grad_a, ctx.master), _master(grad_b, ctx.master), None, None


def _master(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient computed in the compute dtype, handed back in the adapter's own (fp32) dtype."""
    return grad if grad is None or grad.dtype == dtype else grad.to(dtype)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero of ``like``'s dtype and device: the ignored ``input`` of ``addmm(beta=0)``, which
    applies the LoRA scaling inside the GEMM (alpha) instead of in a separate pass (bit-identical)."""
    return like.new_zeros(())


class _LoRAAddFunction(torch.autograd.Function):
    """base_out + s·(x·Aᵀ)·Bᵀ for a base layer we cannot compute ourselves (a bitsandbytes 4-bit or
    8-bit layer: its own kernels de-quantise, and for int8 also quantise x, so its output and its
    input gradient are bitsandbytes' own, exactly as under PEFT). The LoRA term is accumulated into
    ``base_out`` in place (``mark_dirty``; the quantised matmul's backward does not read its
    output), in the base output's dtype, and the backward adds only the LoRA share of x's gradient:
    autograd sums it with the base layer's."""

    @staticmethod
    def forward(ctx, x, base_out, lora_a, lora_b, scaling: float):
        cd = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        a, b = lora_a.to(cd), lora_b.to(cd)
        xa_t = a @ x2.t()  # (r, N), as in _LoRAFunction
        if base_out.is_contiguous():
            base_out.view(-1, base_out.shape[-1]).addmm_(xa_t.t(), b.t(), alpha=scaling)
            ctx.mark_dirty(base_out)
            out = base_out
        else:
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), xa_t.t(), b.t(), alpha=scaling)
            out = _unviewed(out, base_out.shape)
        ctx.save_for_backward(x2, a, b, xa_t)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.master = scaling, x.shape, x.dtype, lora_a.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, a, b, xa_t = ctx.saved_tensors
        s, needs = ctx.scaling, ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
        gb_t = b.t().contiguous() @ g.t() if (needs[0] or needs[2]) else None  # (r, N)
        grad_b = torch.addmm(_zero(g), xa_t, g, beta=0, alpha=s).t() if needs[3] else None
        grad_x = torch.mm(gb_t.t(), a).mul_(s).reshape(ctx.x_shape).to(ctx.x_dtype) if needs[0] else None
        grad_a = torch.addmm(_zero(g), gb_t, x2, beta=0, alpha=s) if needs[2] else None
        return grad_x, grad_out, _master(grad_a, ctx.master), _master(grad_b, ctx.master), None


def _autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast computes in on ``device_type`` (a fast-path call must already be in it)."""
    get = getattr(torch, "get_autocast_dtype", None)  # torch ≥ 2.4
    if get is not None:
        return get(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


class _GroupFunction(torch.autograd.Function):
    """Every member's base(x) + s·(x·Aᵀ)·Bᵀ for layers that share the input x, as one node.

    Forward: the members' A's are stacked and applied in one GEMM (Σr × N); each member's base
    output gets its rows' LoRA term accumulated in place, as in :class:`_LoRAFunction`.
    Backward: x's gradient is built in one buffer, ``g_1·W_1`` followed by ``addmm_`` of every
    other member's ``g_i·W_i`` and of the LoRA share (one GEMM over the stacked A's), where
    autograd would sum one full-width gradient per member; the stacked A's get their gradient from
    one GEMM. One Python node per group instead of one per layer.

    ``spec`` holds per member ``(transposed, scaling, rank)``; ``tensors`` per member
    ``(weight, bias or None, A, B)``.
    """

    @staticmethod
    def forward(ctx, x, spec, *tensors):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ws, biases, a_list = tensors[0::4], tensors[1::4], tensors[2::4]
        b_list = [b.to(x.dtype) for b in tensors[3::4]]  # fp32 master weights → the compute dtype
        a_cat = torch.cat(a_list).to(x.dtype)
        xa_t = a_cat @ x2.t()  # (Σr, N): r rows per member (see _LoRAFunction)
        rows = xa_t.split([r for _, _, r in spec])
        outs = []
        for (transposed, s, _), w, bias, b, xa in zip(spec, ws, biases, b_list, rows):
            out = _base_out(x2, w, bias, transposed)
            out.addmm_(xa.t(), b.t(), alpha=s)
            outs.append(_unviewed(out, (*shape[:-1], out.shape[-1])))
        ctx.save_for_backward(x2, a_cat, xa_t, *ws, *b_list)
        ctx.spec, ctx.shape, ctx.master = spec, shape, a_list[0].dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, a_cat, xa_t, *wb = ctx.saved_tensors
        spec, k = ctx.spec, len(ctx.spec)
        ws, b_list = wb[:k], wb[k:]
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_a = any(needs[4::4])
        ranks = [r for _, _, r in spec]
        scales = {s for _, s, _ in spec}
        # one scaling for every member (the usual case: one adapter) is applied inside the GEMMs
        # that use Bᵀ·gᵀ; otherwise each member's rows are scaled where they are written
        s_all = scales.pop() if len(scales) == 1 else None
        gb_t = xa_t.new_empty(xa_t.shape) if (need_x or need_a) else None  # (Σr, N)
        zero = _zero(x2)
        grad_x = None
        grad_bs = []
        # member by member, every product that reads its g back to back while g is in cache
        # (r-wide GEMMs are bound by memory traffic on a CPU): Bᵀ·gᵀ into its rows of gb_t, B's
        # gradient, then its share of x's gradient, accumulated in one buffer
        gb_rows = gb_t.split(ranks) if gb_t is not None else (None,) * k
        for i, ((transposed, s, _), w, b, xa, out, grad) in enumerate(
                zip(spec, ws, b_list, xa_t.split(ranks), gb_rows, grads)):
            g = grad.reshape(-1, grad.shape[-1])
            if out is not None:
                torch.mm(b.t().contiguous(), g.t(), out=out)
                if s_all is None:
                    out.mul_(s)
            grad_bs.append(torch.addmm(zero, xa, g, beta=0, alpha=s).t() if needs[5 + 4 * i] else None)
            if need_x:
                w = w.t() if transposed else w
                grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
        s_gb = 1.0 if s_all is None else s_all
        if need_x:
            grad_x.addmm_(gb_t.t(), a_cat, alpha=s_gb)
            grad_x = grad_x.reshape(ctx.shape)
        grad_as = torch.addmm(zero, gb_t, x2, beta=0, alpha=s_gb).split(ranks) if need_a else (None,) * k
        result = [grad_x, None]
        for i in range(k):
            grad_a = grad_as[i] if needs[4 + 4 * i] else None
            result += [None, None, _master(grad_a, ctx.master), _master(grad_bs[i], ctx.master)]
        return tuple(result)


class _SharedInput:
    """The layers of one shared-input set in one block, and the outputs of the current call.

    The first member called with a tensor x runs :class:`_GroupFunction` for every member able to
    use it (the same one active, unmerged adapter, no dropout, same dtype: see ``_fused``) and
    keeps the others' outputs; each of those takes its own if it is called with the very same
    tensor (``is`` and an unchanged version counter). The references are dropped as soon as every
    member has taken its output. If a member is not called with that x (a model whose siblings read
    different inputs after all), the outputs computed for it were wasted: the group then turns
    itself off for good and every member runs alone.
    """

    def __init__(self, members):
        self.members = list(members)
        self.x = None
        self.version = -1
        self.outs: dict[int, torch.Tensor] = {}
        self.enabled = True

    def output_for(self, layer, x, name):
        if not self.enabled:
            return None
        version = -1 if x.is_inference() else x._version  # inference tensors have no counter
        if self.x is not x or self.version != version:
            if self.outs:  # a member did not take its output: the guess that they share x was wrong
                self.x, self.outs, self.enabled = None, {}, False
                return None
            use = []
            for m in self.members:
                f = m._fused(x)
                if f is not None and f[0] == name:
                    use.append((m, f))
            if len(use) < 2 or all(m is not layer for m, _ in use):
                return None
            spec = tuple((m.transposed, f[3], f[1].shape[0]) for m, f in use)
            tensors = [t for _, f in use for t in (f[4], f[5], f[1], f[2])]
            outs = _GroupFunction.apply(x, spec, *tensors)
            self.outs = {id(m): o for (m, _), o in zip(use, outs)}
            self.x, self.version = x, version
        out = self.outs.pop(id(layer), None)
        if not self.outs:
            self.x = None
        return out
