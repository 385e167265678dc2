"""The adapter alone as a GGUF LoRA: llama.cpp's ``--lora FILE`` and Ollama's ``ADAPTER FILE``, a file
of a few MB that applies to the base model's GGUF.

The layout is llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``, ``adapter.type =
lora``, ``adapter.lora.alpha``, and for each adapted matrix ``<gguf name>.lora_a`` (r × in) and
``<gguf name>.lora_b`` (out × r). llama.cpp scales each pair by alpha / r (r read from lora_a), so
each module's own scaling (and the weight of each adapter in a combination, where the pairs are
concatenated: rank Σ r_i, exactly the weighted sum of the ΔW's) is folded into B; alpha is written
as the rank when every module has the same one (llama.cpp's alpha / r is then 1) and as 0 otherwise
(llama.cpp then applies B·A unscaled). For the llama family, B's rows get the same permutation as
q_proj and k_proj.

Proof before it is moved into place: the pairs are read back with gguf's reader, B un-permuted by
transformers' own inverse, and the base model with each ΔW = scale · B·A added is compared on fixed
prompts with the base model running the adapter(s) unmerged: logits within 1e-2 relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core import gguf_arch
from core.errors import StudioError

LOGITS_TOLERANCE = 1e-2


def _pairs(spec: str, folders: Sequence[Path], weights: Sequence[float] | None, model) -> dict[str, tuple]:
    """Module name → (A, B·scale) with every adapter's pairs concatenated (fp32)."""
    from core import adapter as adapter_io
    from core.library import check_adapter

    weights = [float(w) for w in (weights or [1.0] * len(folders))]
    if len(weights) != len(folders):
        raise StudioError(f"--weights: {len(weights)} weight(s) for {len(folders)} adapter(s); give one per adapter")
    pairs: dict[str, tuple[list, list]] = {}
    for f, w in zip(folders, weights):
        problems, _ = check_adapter(f, model)
        if problems:
            raise StudioError(f"--adapter {f}: does not fit {spec}: {problems[0]}")
        files = adapter_io.align_to(adapter_io.read_adapter(f), model)
        for module, (a, b) in files.tensors.items():
            entry = pairs.setdefault(module, ([], []))
            entry[0].append(a.float())
            entry[1].append(b.float() * (files.scaling(module) * w))
    return {m: (torch.cat(a, 0), torch.cat(b, 1)) for m, (a, b) in pairs.items()}


def _write(path: Path, config, pairs: dict[str, tuple], name: str) -> dict:
    import gguf

    fam = gguf_arch.family_of(config)
    names = gguf_arch.gguf_names(config, [m + ".weight" for m in pairs])
    if "output.weight" in names.values() and getattr(config, "tie_word_embeddings", False):
        raise StudioError("--adapter: it changes the output head, which this model shares with its embeddings; "
                          "llama.cpp's LoRA cannot apply that")
    ranks = {int(a.shape[0]) for a, _ in pairs.values()}
    alpha = float(ranks.pop()) if len(ranks) == 1 else 0.0  # 0: llama.cpp applies B·A as it is
    writer = gguf.GGUFWriter(str(path), fam.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, (a, b) in pairs.items():
        g = names[module + ".weight"]
        r = a.shape[0]
        scale = alpha / r if alpha else 1.0
        b = gguf_arch.transform(config, module + ".weight", b) / scale
        writer.add_tensor(g + ".lora_a", a.contiguous().numpy().astype(np.float16))
        writer.add_tensor(g + ".lora_b", b.contiguous().numpy().astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"arch": fam.arch, "modules": len(pairs), "alpha": alpha}


def read_deltas(path: Path, config) -> dict[str, torch.Tensor]:
    """GGUF tensor base name → ΔW as llama.cpp applies it (scale · B·A), B un-permuted by transformers'
    inverse of llama.cpp's permutation."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    unpermute = LlamaTensorProcessor()._reverse_permute_weights
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    deltas = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = tensors[base + ".lora_b"]
        if gguf_arch.family_of(config).permute_qk and ".attn_q." in base:
            b = unpermute(b, heads, heads)
        elif gguf_arch.family_of(config).permute_qk and ".attn_k." in base:
            b = unpermute(b, heads, kv)
        scale = alpha / a.shape[0] if alpha else 1.0
        deltas[base] = torch.from_numpy(b @ a) * scale
    return deltas


@torch.no_grad()
def verify(path: Path, spec: str, folders: Sequence[Path], weights, config) -> dict:
    """Base + the file's ΔW's against base + the adapters unmerged, on core.export's prompts."""
    from core import export, lora, models

    loaded = models.load_model(spec, device="cpu", precision="fp32")
    model, tok = loaded.model, loaded.tokenizer
    inputs = [torch.tensor([tok(p)["input_ids"][:64]]) for p in export.PROMPTS]
    weights = [float(w) for w in (weights or [1.0] * len(folders))]
    from core import adapter as adapter_io

    for i, (f, w) in enumerate(zip(folders, weights)):
        export._inject(model, export._Part(adapter_io.align_to(adapter_io.read_adapter(f), model), w, f"g{i}"))
    lora.set_active_adapters(model, [f"g{i}" for i in range(len(folders))])
    want = export._logits(model, inputs)
    model = lora.unload(model, merge=False)
    names = gguf_arch.gguf_names(config, [n for n, _ in model.named_parameters()])
    by_gguf = {g: h for h, g in names.items()}
    for base, delta in read_deltas(path, config).items():
        p = model.get_parameter(by_gguf[base])
        p.add_(delta.to(p.dtype))
    got = export._logits(model, inputs)
    c = export._compare(got, want)
    c["tolerance"] = LOGITS_TOLERANCE
    if not c["relative"] <= LOGITS_TOLERANCE:
        raise StudioError(f"GGUF LoRA check failed: base + the file's ΔW differs from base + adapter by "
                          f"{c['relative']:.3g} relative (tolerance {LOGITS_TOLERANCE:g}); nothing was written")
    return c


def export_lora(spec: str, folders: Sequence[Path], weights, *, out, name: str | None = None,
                system: str | None = None, sampling: dict | None = None,
                progress: Callable[[str, float], None] | None = None,
                cancelled: Callable[[], bool] | None = None) -> dict:
    """Write ``out/<name>.gguf`` (the LoRA) and ``out/Modelfile`` (``FROM`` the base's GGUF, ``ADAPTER``)."""
    import time

    from core import gguf_export, models, ollama

    t0 = time.perf_counter()
    if not folders:
        raise StudioError("--adapter-only: give at least one --adapter")
    config = models.load_config(spec)
    ref = models.resolve(spec)
    fname = name if name and name.endswith(".gguf") else gguf_export.file_name(
        name or ref.name, [f.name for f in folders], "f16", adapter_only=True)
    out = Path(out).expanduser()
    target, modelfile = gguf_export.destination(out, fname)

    def say(message: str, fraction: float) -> None:
        gguf_export._say(progress, cancelled, message, fraction)

    say("reading the adapters", 0.05)
    pairs = _pairs(spec, folders, weights, models.meta_model(spec))
    with gguf_export.staging(out, fname) as stage:
        say("writing the GGUF LoRA", 0.2)
        written = _write(stage / fname, config, pairs, fname[:-5])
        say("checking it against the adapter on the base model", 0.4)
        figures = verify(stage / fname, spec, folders, weights, config)
        say("writing the Modelfile", 0.95)
        if ref.kind in ("default", "gguf"):
            base, note = str(ref.path), None
        else:
            base = f"./{gguf_export.file_name(ref.name, [], 'f16')}"
            note = (f"# FROM needs the base model as GGUF: lora-studio export-gguf --model {spec} --type f16 "
                    f"--out {out}")
        text = ollama.modelfile(base, models.checkpoint_folder(spec), adapter=f"./{fname}", system=system,
                                sampling=sampling)
        (stage / "Modelfile").write_text(text if note is None else note + "\n" + text, encoding="utf-8")
        gguf_export.publish([(stage / fname, target), (stage / "Modelfile", modelfile)])
    say("done", 1.0)
    return {"out": str(target), "modelfile": str(modelfile), "type": "lora-f16", "size_bytes": target.stat().st_size,
            "model": spec, "adapters": [str(f) for f in folders], "weights": list(weights or []),
            "arch": written["arch"], "modules": written["modules"], "alpha": written["alpha"],
            "verify": figures, "seconds": {"total": round(time.perf_counter() - t0, 3)}}
