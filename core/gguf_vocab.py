"""The tokenizer inside a GGUF file, as llama.cpp reads it, and the proof that it tokenizes like the
Hugging Face tokenizer it came from.

llama.cpp does not run ``tokenizer.json``: it rebuilds a tokenizer from metadata (llama.cpp's
``convert_hf_to_gguf.py`` writes the same keys; ``src/llama-vocab.cpp`` reads them):

* ``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE: Llama 3, Qwen, SmolLM, GPT-2) or ``llama``
  (SentencePiece-style BPE with byte fallback: Llama 2, Mistral, Gemma, Phi-3);
* ``tokenizer.ggml.pre``: the *name* of a pre-tokenizer llama.cpp implements itself (a list of split
  regexes per name). A wrong name gives a file that loads and answers, with slightly wrong tokens:
  one of the "GGUF answers garbage" reports. llama.cpp's converter picks the name by hashing the
  tokenization of a fixed text (``CHECK_TEXT``); we do the same for the models it knows, and for any
  other tokenizer (a tiny or retrained one) we pick the name whose regexes reproduce the Hugging Face
  tokenizer on that text, or refuse;
* the tokens, their types (normal, control, user-defined, byte, unused), the merges (gpt2) or scores
  (llama), the special token ids, whether BOS/EOS are added, and the chat template.

:func:`check_tokenizer` proves the written metadata: for ``gpt2`` files it builds llama.cpp's
tokenizer from the metadata alone (the same vocabulary, merges and llama.cpp's regexes for the
pre-tokenizer name, with the ``tokenizers`` library) and compares its ids with the Hugging Face
tokenizer's on a fixed multilingual text (accents, CJK, emoji, code, every special token); for
``llama`` files it uses transformers' own GGUF tokenizer reader.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

from core.errors import StudioError

CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
              'there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
"""llama.cpp's ``chktxt``: its converter hashes the ids of this text to name the pre-tokenizer."""

PROBE_TEXT = ("Héllo wörld! Ça coûte 12,50 € — naïve café. Привет, мир. 日本語のテキストと中文。 한국어 🚀😀👍🏽\n"
              "def add(a, b):\n    return a + b  # 1234567 tokens\n\tx = {'key': [1, 2, 3]}\n")
"""The fixed text of the tokenizer check: accents, Cyrillic, CJK, Hangul, emoji, code, tabs, digits."""

KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
"""Hashes (sha256 of ``str(ids of CHECK_TEXT)``) from llama.cpp's ``convert_hf_to_gguf.py``, for the
pre-tokenizers below."""

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_REGEXES = {
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "gpt-2": [_GPT2],
}
"""llama.cpp's split regexes per pre-tokenizer name (``llm_tokenizer_bpe`` in ``src/llama-vocab.cpp``),
applied one after the other; ``llama-bpe`` also makes llama.cpp ignore merges for whole-word tokens."""

IGNORE_MERGES = {"llama-bpe"}

# gguf.TokenType values (kept here so that reading this module needs no gguf import)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _tokenizer_json(folder: Path) -> dict:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise StudioError(f"{folder}: no tokenizer.json; a GGUF file needs the fast tokenizer's vocabulary",
                          hint="save the tokenizer with transformers (tokenizer.save_pretrained) beside the model")
    return json.loads(path.read_text(encoding="utf-8"))


def tokenizer_kind(folder: Path) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (BPE with byte fallback, SentencePiece-style); anything
    else (WordPiece, Unigram) is refused in one line."""
    model = _tokenizer_json(folder).get("model", {})
    if model.get("type") == "BPE":
        return "llama" if model.get("byte_fallback") else "gpt2"
    raise StudioError(f"{folder}/tokenizer.json: a {model.get('type', 'unknown')} tokenizer; the GGUF export "
                      "writes byte-level BPE (gpt2) and SentencePiece-style BPE (llama) tokenizers only")


def _looks_special(text: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens spelled like control tokens."""
    return ((text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")) or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"))


def _gpt2_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """``get_vocab_base`` of llama.cpp's converter: every id below the embedding's size, [PADi] for holes."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if decoder[i].special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types


def _merge_ranks(folder: Path) -> dict[str, int]:
    """For a SentencePiece-style BPE: the rank of the merge that makes each token (llama.cpp's ``llama``
    tokenizer merges the pair whose result has the highest score, so score = -rank reproduces BPE)."""
    merges = _tokenizer_json(folder).get("model", {}).get("merges") or []
    ranks: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ranks.setdefault(a + b, r)
    return ranks


def _llama_tokens(folder: Path, tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    specials = set(tokenizer.all_special_ids)
    added = tokenizer.get_added_vocab()
    ranks = _merge_ranks(folder)
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]"), scores.append(-10000.0), types.append(UNUSED)
            continue
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            kind = BYTE
        elif i in specials or (t in added and _looks_special(t)):
            kind = CONTROL
        elif t in added:
            kind = USER_DEFINED
        elif t == getattr(tokenizer, "unk_token", None):
            kind = UNKNOWN
        else:
            kind = NORMAL
        tokens.append(t)
        scores.append(-float(ranks[t]) if t in ranks else (0.0 if kind == NORMAL else -1000.0))
        types.append(kind)
    return tokens, scores, types


def pre_tokenizer_name(tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` llama.cpp needs for this byte-level BPE tokenizer: from llama.cpp's
    table of hashes, else the first name whose regexes reproduce this tokenizer (see module doc)."""
    ids = tokenizer.encode(CHECK_TEXT)
    name = KNOWN_HASHES.get(sha256(str(ids).encode()).hexdigest())
    if name is not None:
        return name
    want = [tokenizer.encode(t, add_special_tokens=False) for t in (CHECK_TEXT, PROBE_TEXT)]
    vocab = tokenizer.get_vocab()
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = tj.get("model", {}).get("merges") or []
    for candidate in _likely_first(tj.get("pre_tokenizer") or {}):
        tok = _bpe_emulator(vocab, merges, candidate, [])
        if [tok.encode(t).ids for t in (CHECK_TEXT, PROBE_TEXT)] == want:
            return candidate
    raise StudioError("tokenizer.json: its pre-tokenizer splits text in a way none of llama.cpp's known "
                      f"pre-tokenizers ({', '.join(PRE_REGEXES)}) reproduces; llama.cpp would tokenize it "
                      "differently, so no GGUF file was written")


def _likely_first(pre: dict) -> list[str]:
    """The pre-tokenizer names to try, the one the tokenizer.json's own structure suggests first."""
    text = json.dumps(pre)
    if "{1,3}" in text:
        first = "llama-bpe"
    elif "Digits" in text and '"individual_digits": true' in text:
        first = "smollm"
    elif "Split" in text:
        first = "qwen2"
    else:
        first = "gpt-2"
    return [first] + [n for n in PRE_REGEXES if n != first]


def _bpe_emulator(vocab: dict[str, int], merges: list, pre: str, specials: list[str]):
    """llama.cpp's ``gpt2`` tokenizer rebuilt with the ``tokenizers`` library: its split regexes for
    ``pre`` in order, byte-level symbols, BPE over the merges; ``specials`` matched whole first."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=pairs, ignore_merges=pre in IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text (``add_special_tokens=True``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer.encode("a")[:1] == [bos]


def adds_eos(tokenizer) -> bool:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos is not None and tokenizer.encode("a")[-1:] == [eos]


def add_vocab(writer, folder: Path, tokenizer, vocab_size: int) -> dict:
    """Write the tokenizer metadata of the checkpoint in ``folder`` (whose ``tokenizer`` is given) for an
    embedding of ``vocab_size`` rows. Returns what was chosen: ``{"model", "pre", "tokens"}``."""
    import gguf

    kind = tokenizer_kind(folder)
    if max(tokenizer.get_vocab().values()) >= vocab_size:
        raise StudioError(f"{folder}: the tokenizer has ids up to {max(tokenizer.get_vocab().values())}, beyond "
                          f"the model's {vocab_size} embeddings")
    if kind == "gpt2":
        pre = pre_tokenizer_name(tokenizer)
        tokens, types = _gpt2_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True)
    else:
        pre = "default"
        tokens, scores, types = _llama_tokens(folder, tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    special.add_special_token["bos"] = adds_bos(tokenizer)  # what the tokenizer does, not a guess from files
    special.add_special_token["eos"] = adds_eos(tokenizer)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return {"model": kind, "pre": pre, "tokens": len(tokens), "chat_template": special.chat_template is not None}


# -- reading it back -------------------------------------------------------------------------------

def read_metadata(path: Path) -> dict[str, Any]:
    """Every key-value of a GGUF file as plain Python values (strings, numbers, lists)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _probe(tokenizer) -> str:
    specials = [t for t in tokenizer.get_added_vocab() if not (len(t) == 6 and t.startswith("<0x"))]
    return PROBE_TEXT + "".join(f"{s} x{s}" for s in specials)


def llama_cpp_ids(meta: dict, text: str) -> list[int]:
    """What llama.cpp's ``gpt2`` tokenizer makes of ``text`` (special tokens parsed), from the file's
    metadata alone."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_REGEXES:
        raise StudioError(f"the GGUF file names the pre-tokenizer '{pre}', which this check does not know")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types))}
    specials = [t for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)]
    tok = _bpe_emulator(vocab, meta.get("tokenizer.ggml.merges") or [], pre, specials)
    return tok.encode(text).ids


def check_tokenizer(path: Path, tokenizer) -> dict:
    """Tokenize the probe text (and every added token) with the file's tokenizer and with ``tokenizer``;
    raise with the first difference. Also checks BOS handling and that the chat template is there."""
    meta = read_metadata(path)
    text = _probe(tokenizer)
    want = tokenizer.encode(text, add_special_tokens=False)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        got = llama_cpp_ids(meta, text)
    else:
        from transformers import AutoTokenizer

        got_tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
        got = got_tok.encode(text, add_special_tokens=False)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise StudioError(f"tokenizer check failed: the GGUF file's tokenizer ({kind}, pre-tokenizer "
                          f"'{meta.get('tokenizer.ggml.pre')}') gives {len(got)} ids, the model's {len(want)}; "
                          f"first difference at token {at} ({got[at:at + 3]} vs {want[at:at + 3]}); nothing was written")
    bos = adds_bos(tokenizer)
    if bool(meta.get("tokenizer.ggml.add_bos_token", False)) != bos:
        raise StudioError(f"tokenizer check failed: the model's tokenizer {'adds' if bos else 'does not add'} "
                          "a BOS token and the GGUF file says otherwise; nothing was written")
    template = getattr(tokenizer, "chat_template", None)
    if template and meta.get("tokenizer.chat_template") != template:
        raise StudioError("tokenizer check failed: the chat template is missing from the GGUF metadata")
    return {"model": kind, "pre": meta.get("tokenizer.ggml.pre"), "ids": len(want), "same_ids": True,
            "add_bos": bos, "chat_template": bool(template)}
