"""What each trick of the LoRA engine buys, measured at the level where it acts.

    .venv/bin/python benchmarks/lora_tricks.py [--samples 60] [--json-out benchmarks/results/lora_tricks-cpu.json]

Three parts, all in one process, one torch thread by default (``--threads``), timed with the main
thread's CPU time (``time.thread_time``: another job's preemption does not count) beside wall time:

1. **The engine, block by block.** A model shaped like ``--model`` (default: the bundled
   SmolLM2-135M-Instruct's config) but with ``--blocks`` blocks (2) and a ``--vocab``-token
   vocabulary (512), randomly initialised, so the blocks dominate the step and the output head does
   not. One step = forward with labels + backward (no optimizer: that is part 2), batch ``--batch``
   × ``--seq`` (4 × 128), r = 8, alpha = 16, all-linear, dropout 0. Variants, each its own copy of
   the same weights, one step of each per round in a rotating order, ratios taken within rounds:

   - ``floor``: every weight frozen, the input embeddings' output requires grad (as train_step.py);
   - ``peft``: PEFT's LoRA, same A (same seed) and settings;
   - ``plain``: our layer computing the textbook expression with autograd, ``base(x) + s·B(A(x))``
     (the path ``core.lora`` takes when the fused one does not apply, e.g. dropout > 0);
   - ``function``: our custom autograd function per layer (LoRA term accumulated into the base output
     and into x's gradient in place, only x and the r-wide A·x saved, no weight gradient, r-wide
     products with r as the row count, scaling inside the GEMMs), shared-input groups off;
   - ``groups``: the engine as it ships: ``function`` plus q/k/v and gate/up as one autograd node
     per group (their A's in one GEMM, x's gradient built in one buffer).

2. **The optimizer.** ``torch.optim.AdamW`` default (foreach) against ``fused=True`` over LoRA
   tensors shaped as on the full ``--model`` (every block, all-linear, r = 8): median ``step()``.

3. **Single operations** behind the layout trick and the scaling trick (N = batch × seq tokens,
   d = the model's hidden and MLP widths, r = 8): the same product computed two ways, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("floor", "peft", "plain", "function", "groups")


def small_model(folder: Path, blocks: int, vocab: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    full_blocks = cfg.num_hidden_layers
    cfg.num_hidden_layers = blocks
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, full_blocks


def build_variants(base, args):
    """``{variant: model}``, each its own copy of ``base``'s weights (see :func:`time_engine` for how
    ``plain``, ``function`` and ``groups`` differ while they run)."""
    import torch

    from core import lora, targets

    names = targets.resolve_targets(base, "all-linear")
    out = {}
    for v in VARIANTS:
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        if v == "floor":
            model.enable_input_require_grads()
        elif v == "peft":
            model, _ = common.peft_model(model, names, args)
        else:
            lora.inject_adapter(model, names, rank=args.rank, alpha=args.alpha)
        common.randomise_lora_b(model)  # B = 0 would let nothing flow through B·A's gradient paths
        model.train()
        out[v] = model
    return out


def time_engine(args, folder):
    import torch

    from core import lora

    base, full_blocks = small_model(folder, args.blocks, args.vocab)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    variants = build_variants(base, args)
    own_fused, own_groups = lora.LoRALinear._fused, lora.FUSE_SHARED_INPUT

    def step(v):
        model = variants[v]
        lora.FUSE_SHARED_INPUT = v == "groups"  # "function": the autograd function layer by layer
        if v == "plain":
            lora.LoRALinear._fused = lambda self, x: None  # the textbook path, autograd throughout
        try:
            c0, t0 = time.thread_time(), time.perf_counter()
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            c1, t1 = time.thread_time(), time.perf_counter()
        finally:
            lora.LoRALinear._fused = own_fused
            lora.FUSE_SHARED_INPUT = own_groups
        for p in model.parameters():
            p.grad = None
        return c1 - c0, t1 - t0, float(loss.detach())

    losses = {v: [step(v)[2] for _ in range(args.warmup)] for v in VARIANTS}
    figures = common.rotating_rounds(VARIANTS, args.samples, step)  # step times itself (thread time)
    cpu = {v: [c for c, _, _ in figures[v]] for v in VARIANTS}
    wall = {v: [w for _, w, _ in figures[v]] for v in VARIANTS}
    return cpu, wall, losses, full_blocks


def time_optimizer(args, folder, full_blocks):
    import torch

    from core import lora, targets

    base, _ = small_model(folder, 1, 16)

    lora.inject_adapter(base, targets.resolve_targets(base, "all-linear"), rank=args.rank, alpha=args.alpha)
    shapes = [tuple(p.shape) for p in lora.lora_parameters(base).values()] * full_blocks
    out = {}
    for name, fused in (("default (foreach)", None), ("fused", True)):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
        times = []
        for i in range(args.opt_steps + 3):
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            c0 = time.thread_time()
            opt.step()
            if i >= 3:
                times.append(time.thread_time() - c0)
        out[name] = statistics.median(times)
    return out, len(shapes), sum(int(torch.Size(s).numel()) for s in shapes)


def time_ops(args, folder):
    """The same product computed two ways, interleaved: ``{label: (a_us, b_us)}``."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    n, r = args.batch * args.seq, args.rank
    g = torch.Generator().manual_seed(0)
    results = {}
    for d in sorted({cfg.hidden_size, cfg.intermediate_size}):
        x = torch.randn(n, d, generator=g)  # an activation (or an output gradient) of width d
        a = torch.randn(r, d, generator=g)  # A (or Bᵀ)
        xa_t = torch.randn(r, n, generator=g)
        zero = x.new_zeros(())
        pairs = {
            f"A·x product, d={d}: x·Aᵀ (N×r) vs A·xᵀ (r×N)": (lambda: x @ a.t(), lambda: a @ x.t()),
            f"B's gradient, d={d}: gᵀ·xa (d×r) vs xaᵀ·g (r×d)": (lambda: x.t() @ xa_t.t(), lambda: xa_t @ x),
            f"scaled B gradient, d={d}: (xaᵀ·g)·s vs addmm(beta=0, alpha=s)":
                (lambda: (xa_t @ x).mul_(2.0), lambda: torch.addmm(zero, xa_t, x, beta=0, alpha=2.0)),
        }
        for label, (fa, fb) in pairs.items():
            ta, tb = [], []
            for _ in range(20):
                fa(), fb()
            for _ in range(args.op_repeats):
                c0 = time.thread_time(); fa(); c1 = time.thread_time(); fb(); c2 = time.thread_time()
                ta.append(c1 - c0)
                tb.append(c2 - c1)
            results[label] = (1e6 * statistics.median(ta), 1e6 * statistics.median(tb))
    return results


def quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="whose config shapes the model ('default' or a local folder)")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--samples", type=int, default=60, help="rounds, one step of each variant each (default 60)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--opt-steps", type=int, default=30)
    p.add_argument("--op-repeats", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.targets = "all-linear"

    import torch

    torch.set_num_threads(args.threads)
    folder = common.model_folder(args.model)
    info = common.machine()
    started = time.time()
    cpu, wall, losses, full_blocks = time_engine(args, folder)
    opt, n_tensors, n_params = time_optimizer(args, folder, full_blocks)
    ops = time_ops(args, folder)

    print(f"1. engine: {args.blocks}-block model shaped like {folder.name}, vocabulary {args.vocab}, "
          f"{args.batch} x {args.seq} tokens, r={args.rank}, all-linear; forward + backward, "
          f"{args.samples} rounds, {args.threads} thread(s), main-thread CPU time")
    print(f"{'variant':<10}{'median':>10}{'÷ floor (quartiles)':>30}{'÷ plain':>10}{'wall':>10}")
    summary = {}
    for v in VARIANTS:
        vs_floor = [a / b for a, b in zip(cpu[v], cpu["floor"])]
        vs_plain = [a / b for a, b in zip(cpu[v], cpu["plain"])]
        q1, med, q3 = quartiles(vs_floor)
        summary[v] = {"median_cpu_ms": 1000 * statistics.median(cpu[v]),
                      "median_wall_ms": 1000 * statistics.median(wall[v]),
                      "per_floor": [round(q1, 4), round(med, 4), round(q3, 4)],
                      "per_plain": round(statistics.median(vs_plain), 4)}
        print(f"{v:<10}{summary[v]['median_cpu_ms']:>7.1f} ms{med:>14.3f} ({q1:.3f}-{q3:.3f})"
              f"{summary[v]['per_plain']:>10.3f}{summary[v]['median_wall_ms']:>7.1f} ms")
    spread = max(abs(losses[v][0] - losses["plain"][0]) for v in VARIANTS if v != "floor")
    print(f"first losses of the LoRA variants differ by at most {spread:.2e}")
    print(f"\n2. optimizer: AdamW.step() over {n_tensors} LoRA tensors ({n_params:,} values, "
          f"{full_blocks} blocks), median of {args.opt_steps}")
    for k, s in opt.items():
        print(f"  {k:<20}{1000 * s:8.1f} ms")
    print(f"\n3. single operations, N={args.batch * args.seq}, r={args.rank}, median of {args.op_repeats} interleaved, µs")
    for label, (ta, tb) in ops.items():
        print(f"  {label:<66}{ta:8.0f} vs {tb:6.0f}  ({tb / ta:.2f}x)")
    print(f"machine: {common.describe(info)}; {time.time() - started:.0f} s")
    common.write_json(args.json_out, {
        "benchmark": "lora_tricks", "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
        "machine": info, "engine": summary, "first_losses": losses, "cpu_times": cpu, "wall_times": wall,
        "optimizer_s": opt, "optimizer_tensors": n_tensors, "optimizer_values": n_params,
        "ops_us": {k: {"first": a, "second": b} for k, (a, b) in ops.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
