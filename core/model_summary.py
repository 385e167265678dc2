"""What a base model is, read without loading its weights: :func:`summary`, which the window's model
page and ``lora-studio models --json`` show, and the small readers it uses (also the hub's and the
memory estimate's): :func:`_cfg`, :func:`_context_length`, :func:`_folder_dtype`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.gguf_convert import _converted_folder, _converted_ok, _gguf_header
from core.model_sources import _weight_files, resolve

def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _folder_dtype(folder: Path) -> str | None:
    """The most common tensor dtype in the checkpoint's first safetensors file (header only)."""
    files = _weight_files(folder)
    if not files:
        return None
    try:
        with open(files[0], "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict):
            counts[v.get("dtype", "?")] = counts.get(v.get("dtype", "?"), 0) + 1
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    return names.get(max(counts, key=counts.get), None) if counts else None


def _folder_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        return bool(cfg.get("chat_template"))
    except (OSError, ValueError):
        return False


def summary(spec: str, trust_remote_code: bool = False) -> dict:
    """What the window's model page and ``models --json`` show, without loading weights.

    Keys: name, kind, spec, path, architecture, model_type, parameters (exact, counted on the meta
    model, a tied embedding once), layers, hidden_size, intermediate_size, attention_heads,
    kv_heads, vocab_size, dtype (as stored: float32/bfloat16/..., or e.g. ``GGUF Q4_1``),
    context_length, chat_template (bool), tied_embeddings (bool), converted (GGUF: cache ready),
    size_bytes.
    """
    from core.models import _build_on_meta, load_config  # at call time: core.models imports this module
    from core.targets import count_parameters

    ref = resolve(spec)
    config = load_config(spec, trust_remote_code)
    model = _build_on_meta(ref, config, trust_remote_code and ref.kind in ("folder", "hub"))
    out: dict[str, Any] = {"name": ref.name, "kind": ref.kind, "spec": ref.spec, "path": str(ref.path)}
    archs = getattr(config, "architectures", None) or [type(model).__name__]

    def get(*keys):
        return _cfg(config, *keys)

    out.update({
        "architecture": archs[0], "model_type": config.model_type,
        "parameters": count_parameters(model),
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": get("hidden_size", "n_embd", "d_model"),
        "intermediate_size": get("intermediate_size", "n_inner", "ffn_dim"),
        "attention_heads": get("num_attention_heads", "n_head"),
        "kv_heads": get("num_key_value_heads", "num_attention_heads", "n_head"),
        "vocab_size": get("vocab_size"),
        "context_length": _context_length(config),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    })
    if ref.kind in ("folder", "hub"):
        stored = _folder_dtype(ref.path)
        out["dtype"] = stored or str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        out["chat_template"] = _folder_has_chat_template(ref.path)
        out["size_bytes"] = sum(f.stat().st_size for f in _weight_files(ref.path) if f.is_file())
    else:
        header, metadata = _gguf_header(ref)
        from transformers.integrations.gguf.dequant import GGML_NAME

        types: dict[str, int] = {}
        for t in header.tensors:
            name = GGML_NAME.get(t.ggml_type, {0: "F32", 1: "F16", 30: "BF16"}.get(t.ggml_type, str(t.ggml_type)))
            types[name] = types.get(name, 0) + t.nbytes
        out["dtype"] = "GGUF " + max(types, key=types.get)
        out["chat_template"] = bool(metadata.get("tokenizer.chat_template"))
        out["size_bytes"] = ref.path.stat().st_size
        folder = _converted_folder(ref.path)
        out["converted"] = _converted_ok(folder)
        out["cache"] = str(folder)
    return out


def _cfg(config, *keys, default=None):
    """The first of ``keys`` that ``config`` has (architectures name the same thing differently)."""
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    return default
