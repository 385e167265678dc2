"""benchmarks/gpu_check.py end to end on the CPU (``--device cpu --small``), in a subprocess, as the
GPU machine will run it at full size: every section present, none failed, and each one's figures are
the real thing (both engines measured over the same adapter, a bit-exact resume after the pause,
the studio's own out-of-memory message followed by a run that repeats its result)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (imports nothing heavy at module level)


def test_the_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                           "--steps", "1", "--warmup", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    failed = {k: s.get("error") for k, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed
    assert proc.returncode == 0, proc.stdout[-3000:]

    for name, quantised in (("bf16_lora", None), ("qlora_nf4", "nf4")):
        cases = sections[name]["cases"]
        assert cases and all(c["status"] == "ok" and c["quantised"] == quantised for c in cases)
        for c in cases:
            for engine in ("ours", "peft"):
                assert c[engine]["tokens_per_second"] > 0 and c[engine]["peak_bytes"] > 0
            assert c["trainable_params"] > 0
            assert c["speed_ratio"] == round(c["ours"]["tokens_per_second"] / c["peft"]["tokens_per_second"], 3)
    assert {c["family"] for c in sections["bf16_lora"]["cases"]} == {gpu_check.ONE_B, gpu_check.EIGHT_B}

    pause = sections["pause"]
    assert pause["max_relative_loss_difference"] == 0.0 and pause["optimizer_tensors_during_pause"] == 0
    assert len(pause["losses"]) == pause["steps"]

    oom = sections["oom"]
    assert oom["raised"] == "StudioError" and oom["message"].startswith("out of memory on cpu")
    assert oom["loss_of_the_same_run_after"] == oom["loss_of_a_small_run_before"]

    tests = sections["gpu_tests"]
    assert "tests/test_gpu.py" in tests["files"] and sum(tests["counts"].values()) == len(tests["tests"]) > 0
    assert "bf16_lora" in proc.stdout and "tokens/s" in proc.stdout  # the table
