"""How each supported architecture goes into a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` does
it: the architecture name, the hyper-parameter keys, the tensor names (gguf's own ``TensorNameMap``)
and the value changes llama.cpp expects.

Families (Hugging Face ``model_type`` → GGUF architecture):

* ``llama``, ``mistral`` → ``llama``: q_proj and k_proj rows are permuted from Hugging Face's
  half-split rotary layout to llama.cpp's interleaved one (``LlamaModel.permute``); Llama 3.1's
  ``llama3`` rope scaling becomes a ``rope_freqs`` tensor (``generate_extra_tensors``);
* ``qwen2``, ``qwen3``, ``phi3``: no value changes (NeoX rotary in llama.cpp); Qwen2's q/k/v biases
  are written as they are; Phi-3's fused qkv and gate_up projections map one to one;
* ``gemma2``, ``gemma3_text`` → ``gemma2``, ``gemma3``: every RMSNorm weight is stored plus one
  (llama.cpp computes ``x * w``, Gemma ``x * (1 + w)``).

What llama.cpp hard-codes instead of reading (Gemma's attention scale from the head size, Gemma 3's
local rope base of 10000 and its 5-local-1-global layer pattern, Gemma 2's alternating one) is checked
against the config, and a model that differs is refused: its GGUF would load and compute something
else. So are rope scalings this writer does not translate (YaRN, LongRoPE, dynamic NTK).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import StudioError


@dataclass(frozen=True)
class Family:
    arch: str
    """The GGUF ``general.architecture`` (a ``gguf.MODEL_ARCH_NAMES`` value)."""
    permute_qk: bool = False
    norm_plus_one: bool = False


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "phi3": Family("phi3"),
    "gemma2": Family("gemma2", norm_plus_one=True),
    "gemma3_text": Family("gemma3", norm_plus_one=True),
}
SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 (text)"


def family_of(config, where: str = "--model") -> Family:
    """The family of a transformers config, or one line saying which ones are supported."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise StudioError(f"{where}: a '{kind}' model; the GGUF export supports {SUPPORTED}",
                          hint="export a merged Hugging Face folder with 'lora-studio merge' instead")
    return FAMILIES[kind]


def _rope(config, layer_type: str | None = None) -> dict:
    """The rope parameters (theta, type, factors) whichever way the config spells them (transformers 5's
    ``rope_parameters``, per layer type for Gemma 3, or the older ``rope_theta`` + ``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    out = dict(params) if isinstance(params, dict) else {}
    if "rope_theta" not in out and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        out = {**scaling, **out} if "rope_type" in out else {**out, **scaling}
    out["rope_type"] = out.get("rope_type") or out.get("type") or "default"
    return out


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _refuse(what: str) -> StudioError:
    return StudioError(f"--model: {what}; llama.cpp would load the GGUF and compute something else, so the "
                       "export is refused", hint="export a merged Hugging Face folder with 'lora-studio merge'")


def check_config(config) -> None:
    """Refuse, before any work, what llama.cpp cannot represent for this family (see module doc)."""
    fam = family_of(config)
    kind = config.model_type
    rope = _rope(config, "full_attention" if kind == "gemma3_text" else None)
    allowed = {"default", "linear"} | ({"llama3"} if fam.arch == "llama" else set())
    if rope["rope_type"] not in allowed:
        raise _refuse(f"its '{rope['rope_type']}' rope scaling is not translated by this export")
    if kind in ("gemma2", "gemma3_text"):
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None and int(scalar) != head_dim(config):
            raise _refuse(f"query_pre_attn_scalar {scalar} differs from the head size {head_dim(config)}, "
                          "from which llama.cpp takes Gemma's attention scale")
        types = list(getattr(config, "layer_types", None) or [])
        period = 2 if kind == "gemma2" else 6
        want = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(types))]
        if types and types != want:
            raise _refuse(f"its layer pattern ({types[:6]}...) is not the one llama.cpp assumes for {kind}")
    if kind == "gemma3_text":
        local = _rope(config, "sliding_attention")
        if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type") not in ("default", None):
            raise _refuse("its sliding layers' rope differs from the base 10000 llama.cpp uses for Gemma 3")
    if getattr(config, "attention_bias", False) and fam.arch not in ("qwen2",):
        raise _refuse("it has attention biases, which this family's llama.cpp graph does not add")


def write_hparams(writer, config, file_type: int) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for this model (``set_gguf_parameters``)."""
    kind = config.model_type
    hd = head_dim(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    rope = _rope(config, "full_attention" if kind == "gemma3_text" else None)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if kind in ("llama", "mistral"):
        writer.add_rope_dimension_count(hd)
    if kind == "phi3":
        writer.add_rope_dimension_count(int(float(rope.get("partial_rotary_factor", 1.0)) * hd))
        orig = getattr(config, "original_max_position_embeddings", None)
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
    if getattr(config, "sliding_window", None) and kind in ("gemma2", "gemma3_text", "phi3", "mistral"):
        writer.add_sliding_window(int(config.sliding_window))
    if kind == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))


def gguf_names(config, state_names: list[str]) -> dict[str, str]:
    """Hugging Face tensor name → GGUF tensor name, for every tensor that goes into the file; a tensor
    gguf's map does not know is refused (it would be silently dropped otherwise)."""
    import gguf

    fam = family_of(config)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == fam.arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out: dict[str, str] = {}
    for name in state_names:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise StudioError(f"--model: the tensor '{name}' has no GGUF name for the {fam.arch} architecture; "
                              "nothing was written")
        out[name] = new
    return out


def _permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rotary pairs (i, i + d/2) of each head become (2i, 2i + 1)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(config, hf_name: str, w: torch.Tensor) -> torch.Tensor:
    """The values llama.cpp expects for ``hf_name`` (fp32 in, fp32 out)."""
    fam = family_of(config)
    if fam.permute_qk:
        heads = config.num_attention_heads
        if ".q_proj." in hf_name:
            return _permute(w, heads, heads)
        if ".k_proj." in hf_name:
            return _permute(w, heads, getattr(config, "num_key_value_heads", None) or heads)
    if fam.norm_plus_one and hf_name.endswith("norm.weight"):
        return w + 1.0
    return w


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the checkpoint has not: Llama 3.1's ``rope_freqs`` (the per-frequency
    divisors of its ``llama3`` rope scaling, computed as llama.cpp's converter does)."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return {}
    base, dim = float(rope.get("rope_theta", 10000.0)), head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    factors: list[float] = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}


def summary(config) -> dict[str, Any]:
    fam = family_of(config)
    return {"model_type": config.model_type, "arch": fam.arch, "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}
