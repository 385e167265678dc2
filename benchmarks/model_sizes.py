"""What a 1B, 3B and 8B model need to train with LoRA, in bf16 and on a 4-bit (nf4) or 8-bit base.

    .venv/bin/python benchmarks/model_sizes.py [--rank 16] [--json-out benchmarks/results/model_sizes.json]

The figures are the studio's own memory estimate (core.models.estimate_memory, the one the Model page
and ``lora-studio targets`` show), computed from the published configurations of Llama 3.2 1B,
Llama 3.2 3B and Llama 3.1 8B written out below (no download, no weights): the estimate needs only
the shapes. How close the estimate is to a measured step is what benchmarks/memory_estimate.py
checks on the bundled default (README: "The memory estimate against a real step"); these rows carry
that error. On a GPU add the CUDA context (about 0.5 GiB) to each total.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# The shapes of the published config.json files (meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B).
SHAPES = {
    "Llama 3.2 1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "Llama 3.2 3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "Llama 3.1 8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
SETTINGS = (  # (label, batch, tokens, gradient checkpointing)
    ("1 × 2048, checkpointing", 1, 2048, True),
    ("4 × 512", 4, 512, False),
)
BASES = (("bf16", "bf16", "none"), ("int8", "bf16", "int8"), ("nf4", "bf16", "nf4"))


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    from transformers import LlamaConfig

    from core import models

    rows = []
    for name, shape in SHAPES.items():
        config = LlamaConfig(max_position_embeddings=131072, **shape)
        for label, batch, seq, ckpt in SETTINGS:
            row = {"model": name, "setting": label}
            for base, precision, quantize in BASES:
                est = models.estimate_memory(config, batch_size=batch, seq_len=seq, rank=args.rank,
                                             targets=args.targets, precision=precision,
                                             gradient_checkpointing=ckpt, quantize=quantize)
                row[base] = est["total"]
                row[f"{base} weights"] = est["weights"]
            rows.append(row)
    print(f"LoRA r={args.rank}, {args.targets}: training memory by the studio's estimate")
    print(f"{'model':<14}{'batch':<26}" + "".join(f"{b:>11}" for b, _, _ in BASES))
    for r in rows:
        print(f"{r['model']:<14}{r['setting']:<26}" + "".join(f"{gib(r[b]):>11}" for b, _, _ in BASES))
    common.write_json(args.json_out, {"benchmark": "model_sizes", "settings": vars(args), "rows": rows,
                                      "machine": common.machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
