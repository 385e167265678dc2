"""A base model's tokenizer: loaded from its checkpoint folder (a GGUF's converted cache), with a pad
token and a context length.

Loading imports torch only when it must. ``AutoTokenizer.from_pretrained(folder)`` reads the model's
config to pick a class, and that imports torch (about 4 s, measured); a folder whose
``tokenizer.json`` is a plain ``tokenizers`` file (``tokenizer_class`` TokenizersBackend or
PreTrainedTokenizerFast, which is how transformers saves one, the bundled default's converted cache
included) is read with ``PreTrainedTokenizerFast`` directly (about 0.9 s, no torch), which is the
class AutoTokenizer would return for it. Every other folder (no tokenizer.json, a model-specific
tokenizer class, or ``trust_remote_code``) goes through AutoTokenizer as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import StudioError
from core.gguf_convert import checkpoint_folder
from core.model_sources import ModelRef, _first_line, resolve

_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<|endoftext|>")


def _ensure_pad_token(tok) -> None:
    """Give the tokenizer a padding token that is not its EOS when it can.

    Padding positions are masked by the attention mask and their labels are -100 by position, so
    which token pads does not change training — unless some code masks labels by *id*, in which
    case a pad equal to EOS would mask every EOS and the model would never learn to stop. So a pad
    that is missing or equal to EOS is replaced by the first of: the unknown token, a token named
    like a pad (``<pad>``, ``<|pad|>``, ...; ``<|endoftext|>`` where it is not EOS), BOS. Only when
    none of these exists (GPT-2, whose only special token is ``<|endoftext|>``) does EOS pad.
    """
    eos = tok.eos_token_id
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return
    vocab = tok.get_vocab()
    for cand in (tok.unk_token, *_PAD_CANDIDATES, tok.bos_token):
        if cand and cand in vocab and vocab[cand] != eos:
            tok.pad_token = cand
            return
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""``tokenizer_class`` values for which AutoTokenizer returns the plain fast tokenizer itself."""


def _plain_fast(folder: Path, trust_remote_code: bool) -> bool:
    """Whether the folder's tokenizer is a plain ``tokenizers`` one that loads without AutoTokenizer
    (and so without torch): a tokenizer.json and a tokenizer_config.json naming a plain class."""
    if trust_remote_code or not (folder / "tokenizer.json").is_file():
        return False
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # AutoTokenizer reads it again and says what is wrong
    return isinstance(cfg, dict) and cfg.get("tokenizer_class") in _PLAIN_CLASSES and not cfg.get("auto_map")


def _read_tokenizer(folder: Path, trust_remote_code: bool):
    if _plain_fast(folder, trust_remote_code):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _tokenizer_from_folder(ref: ModelRef, folder: Path, trust_remote_code: bool = False):
    hint = ("a checkpoint folder needs its tokenizer files (tokenizer.json, tokenizer_config.json) "
            "beside the weights")
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise StudioError(f"--model {ref.spec}: {folder} has no tokenizer files", hint=hint)
    try:
        tok = _read_tokenizer(folder, trust_remote_code)
    except Exception as e:  # noqa: BLE001  (the tokenizers library reports a malformed file as a bare Exception)
        raise StudioError(f"--model {ref.spec}: cannot load the tokenizer from {folder} ({_first_line(e)})",
                          hint=hint) from None
    _ensure_pad_token(tok)
    if not isinstance(tok.model_max_length, int) or isinstance(tok.model_max_length, bool):
        tok.model_max_length = int(1e30)  # tokenizer_config.json's value was not a number: "no limit" as HF says it
    if tok.model_max_length > 10**8:
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            ctx = raw.get("max_position_embeddings") or raw.get("n_positions")
            if isinstance(ctx, int) and ctx > 0:
                tok.model_max_length = ctx
        except (OSError, ValueError):
            pass
    return tok


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (see :func:`_ensure_pad_token`) and ``model_max_length``
    set from the config's context length where the tokenizer gives none. A GGUF is converted first
    (once), so its tokenizer is read from the cache in milliseconds afterwards."""
    ref = resolve(spec)
    return _tokenizer_from_folder(ref, checkpoint_folder(spec), trust_remote_code)