"""Writing a Hugging Face checkpoint folder as one GGUF file, and reading it back to prove it.

The writer streams: the tensor table is planned from the safetensors headers, then each tensor is
read, changed as llama.cpp expects (core.gguf_arch), quantised with gguf's numpy quantisers (the
same block formats llama.cpp reads: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and written, so memory
holds one tensor at a time, never the model.

Which tensors get which type follows llama.cpp's converter: 1-D tensors, norms and biases stay F32;
a matrix whose rows are not a multiple of the 32-value block falls back to F16; in Q4/Q5 files the
token embedding and the output head are Q8_0 (llama.cpp's own quantizer likewise keeps the output at
a higher precision: it shapes every token's probability).

The read-back (:func:`read_back`) is independent of the writer: the file is parsed by gguf's
``GGUFReader``, de-quantised by gguf, un-permuted and un-offset by *transformers'* GGUF loader
(``TENSOR_PROCESSORS``), named by transformers' GGUF name map, and loaded into a transformers model
of the checkpoint's config. The hyper-parameters are read back by transformers' GGUF config reader
and compared with the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core import gguf_arch
from core.errors import Cancelled, StudioError

TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""What the numpy writer makes, best first."""

BYTES_PER_WEIGHT = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                    "q4_1": 20 / 32, "q4_0": 18 / 32, "q6_k": 210 / 256, "q5_k_m": 176 / 256,
                    "q4_k_m": 144 / 256, "q3_k_m": 110 / 256, "q2_k": 84 / 256}


def _ggml(type_name: str):
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    table = {"f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16), "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
             "q5_1": (q.Q5_1, f.MOSTLY_Q5_1), "q5_0": (q.Q5_0, f.MOSTLY_Q5_0), "q4_1": (q.Q4_1, f.MOSTLY_Q4_1),
             "q4_0": (q.Q4_0, f.MOSTLY_Q4_0)}
    return table[type_name]


def _tensor_type(gguf_name: str, shape: tuple[int, ...], main):
    """The GGML type of one tensor in a file of type ``main`` (see module doc)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return q.F32
    if main in (q.F16, q.BF16):
        return main
    if shape[-1] % 32 != 0:
        return q.F16
    if main != q.Q8_0 and gguf_name in ("token_embd.weight", "output.weight"):
        return q.Q8_0
    return main


def _headers(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name → (safetensors file, shape), from the headers alone."""
    from core.library import safetensors_header

    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if isinstance(info, dict) and "shape" in info:
                found[name] = (f, tuple(int(s) for s in info["shape"]))
    if not found:
        raise StudioError(f"{folder}: no safetensors weights to write")
    return found


def _encode(w: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    q = gguf.GGMLQuantizationType
    a = w.detach().to(torch.float32).contiguous().numpy()
    if qtype == q.F32:
        return a
    if qtype == q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def write_gguf(folder: Path, path: Path, type_name: str, *, name: str,
               progress: Callable[[str, float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> dict:
    """Write the checkpoint in ``folder`` to the GGUF file ``path`` in ``type_name`` (one of TYPES)."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from core import gguf_vocab

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    gguf_arch.check_config(config)
    fam = gguf_arch.family_of(config)
    main, file_type = _ggml(type_name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    headers = _headers(folder)
    names = gguf_arch.gguf_names(config, list(headers))
    extras = gguf_arch.extra_tensors(config)

    writer = gguf.GGUFWriter(str(path), fam.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_arch.write_hparams(writer, config, int(file_type))
    vocab = gguf_vocab.add_vocab(writer, Path(folder), tokenizer, int(config.vocab_size))

    plan = [(g, None, tuple(t.shape)) for g, t in extras.items()] + [(g, h, headers[h][1]) for h, g in names.items()]
    counts: dict[str, int] = {}
    for g, _h, shape in plan:
        qtype = _tensor_type(g, shape, main)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(g, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(g, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[Path, object] = {}
    try:
        for i, (g, h, shape) in enumerate(plan):
            if cancelled is not None and cancelled():
                raise Cancelled()
            if h is None:
                w = extras[g]
            else:
                f = headers[h][0]
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt", device="cpu")
                w = gguf_arch.transform(config, h, handles[f].get_tensor(h).to(torch.float32))
            writer.write_tensor_data(_encode(w, _tensor_type(g, shape, main)))
            if progress is not None:
                progress(f"writing {g}", (i + 1) / len(plan))
    finally:
        handles.clear()
        writer.close()
    return {"arch": fam.arch, "tensors": len(plan), "tensor_types": counts, "tokenizer": vocab}


# -- reading it back ---------------------------------------------------------------------------------

def _check_hparams(path: Path, config) -> dict:
    """transformers' GGUF config reader against the checkpoint's config, key by key."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    want = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": gguf_arch._rope(config, "full_attention" if config.model_type == "gemma3_text"
                                          else None).get("rope_theta")}
    for key, value in want.items():
        if key not in parsed or value is None:
            continue
        got = parsed[key]
        if not np.isclose(float(got), float(value), rtol=1e-6, atol=0):
            raise StudioError(f"GGUF check failed: the file says {key} = {got}, the model has {value}; "
                              "nothing was written")
    return {k: parsed[k] for k in want if k in parsed}


def read_back(path: Path, config) -> torch.nn.Module:
    """The GGUF file as a transformers model of ``config`` in fp32, through transformers' GGUF tensor
    processors (see module doc). Every tensor of the model must come from the file."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    fam = gguf_arch.family_of(config)
    hp = _check_hparams(path, config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(fam.arch, TensorProcessor)(config={
        "num_attention_heads": hp.get("num_attention_heads", config.num_attention_heads),
        "num_key_value_heads": hp.get("num_key_value_heads", config.num_attention_heads)})
    name_map = get_gguf_hf_weights_map(skeleton, processor, model_type=fam.arch)
    state: dict[str, torch.Tensor] = {}
    for t in GGUFReader(str(path)).tensors:
        w = dequantize(t.data, t.tensor_type)
        result = processor.process(weights=w, name=t.name, tensor_key_mapping=name_map, parsed_parameters={})
        if result.name in name_map:
            state[name_map[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in allowed]
    if missing:
        raise StudioError(f"GGUF check failed: the file has no tensor for '{missing[0]}' "
                          f"({len(missing)} missing); nothing was written")
    if allowed:
        model.tie_weights()
    return model.eval()


def load_reference(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False).eval()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` (1, T); never stops early (the end-of-text token is one more
    token to compare)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                           eos_token_id=None, bos_token_id=None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return [int(t) for t in out[0, ids.shape[1]:]]


def config_json(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
