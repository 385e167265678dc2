"""Datasets of any size: peak memory and time of ``lora-studio data`` and of a first training step
on a large JSONL file, and of a second look at the same file.

    .venv/bin/python benchmarks/big_dataset.py [--rows 1000000] [--model default]
        [--json-out benchmarks/results/big_dataset-cpu.json]

The file is generated here into a temporary folder (never committed): instruction/output rows of
about 320 bytes like ``{"instruction": "Add 123 and 456 and say it in words ...", "output": ...}``
(1,000,000 rows, about 320 MB), seeded, so every run reads the same bytes. Each measured command
runs in a fresh process under ``/usr/bin/time -v`` (its "Maximum resident set size" is the peak),
with one fresh ``LORA_STUDIO_HOME`` shared by the runs:

1. ``lora-studio data FILE --model M --json`` (the first look: reading, tokenising, statistics);
2. the same again (the second look: nothing changed, so the tokenised cache is reused);
3. ``lora-studio train --model M --data FILE --steps 1`` (the first training step);
4. the same training step on a 2,000-row file of the same rows (what the step needs whatever the
   dataset's size: the model, its activations, the optimizer);
5. that step with ``--gradient-checkpointing``, and 6. with ``--precision bf16`` (where the step's
   memory goes: the activations, then the fp32 weights).

Run it under ``flock /tmp/heavy.lock`` on a shared machine: it keeps both cores busy for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()


def make_file(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            a, b = rng.randrange(1000), rng.randrange(1000)
            extra = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 40)))
            row = {"instruction": f"Add {a} and {b}, then repeat these words: {extra}",
                   "output": f"{a + b}. {extra}"}
            f.write(json.dumps(row) + "\n")


def measured(argv: list[str], env: dict) -> dict:
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "studio", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"argv": argv, "seconds": round(wall, 2), "peak_rss_mb": round(int(m.group(1)) / 1024, 1),
            "stdout": p.stdout}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--model", default="default")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-studio-big-") as tmp:
        tmp = Path(tmp)
        data = tmp / f"rows-{args.rows}.jsonl"
        make_file(data, args.rows)
        env = dict(os.environ, LORA_STUDIO_HOME=str(tmp / "home"), TOKENIZERS_PARALLELISM="true")
        from core.home import models_dir

        home_models = models_dir()
        if args.model == "default" and home_models.is_dir():
            (tmp / "home").mkdir()
            (tmp / "home" / "models").symlink_to(home_models)  # the default, converted once already
        small = tmp / "rows-2000.jsonl"
        make_file(small, 2000)
        runs = {}
        for name, argv in (("data_first", ["data", str(data), "--model", args.model, "--json"]),
                           ("data_second", ["data", str(data), "--model", args.model, "--json"]),
                           ("train_first_step", ["train", "--model", args.model, "--data", str(data),
                                                 "--out", str(tmp / "run"), "--steps", "1",
                                                 "--no-progress"]),
                           *((f"train_first_step_2000_rows{suffix}",
                              ["train", "--model", args.model, "--data", str(small), "--out",
                               str(tmp / f"run-small{suffix}"), "--steps", "1", "--no-progress", *extra])
                             for suffix, extra in (("", []), ("_gradient_checkpointing", ["--gradient-checkpointing"]),
                                                   ("_bf16", ["--precision", "bf16"])))):
            r = measured(argv, env)
            if name == "data_first":
                stats = json.loads(r["stdout"])["stats"]
            r.pop("stdout")
            runs[name] = r
            print(f"{name}: {r['seconds']} s, peak {r['peak_rss_mb']} MB", flush=True)
        result = {"benchmark": "big_dataset", "machine": common.machine(), "rows": args.rows,
                  "file_bytes": data.stat().st_size, "examples": stats["examples"], "tokens": stats["tokens"],
                  "model": args.model, "runs": runs}
    common.emit(result)
    common.write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
