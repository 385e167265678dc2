"""Rendering one row as the model is trained on it: the conversation, the chat template, the
trained character spans, the token ids and labels.

**Rendering.** Conversations are rendered with the tokenizer's chat template where it has one. Each
assistant turn is located as the text between ``render(turns before it, add_generation_prompt=True)``
and ``render(turns up to it)``, after checking that each is a prefix of the next (a template that
renders history differently, like those that drop earlier reasoning, has those turns kept as context
but not trained). The whole conversation is tokenised once, exactly as at inference, and each token
is trained when it *starts* inside an answer span (character offsets from the fast tokenizer). A
tokenizer without a chat template gets a documented plain template (:data:`PLAIN_TEMPLATE`)::

    {system}\\n\\n                        (only when there is a system message)
    ### Instruction:\\n{user}\\n\\n
    ### Response:\\n{assistant}{eos}      (the answer and the EOS are trained)
    \\n\\n### Instruction:\\n...          (further turns)

A ``prompt-completion`` row without a chat template is the raw concatenation ``prompt + completion +
eos`` (what prompt/completion means for a base model); a ``text`` row is ``text + eos``, all trained.

**End of turn.** Every answer ends in a trained end-of-turn token: the template's own (ChatML's
``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, or EOS), found in the answer span;
anything after it in the span (ChatML's trailing newline) is not trained. A template that writes no
such token gets the EOS inserted after the answer. A model that never sees a trained stop token never
learns to stop, the most common complaint about fine-tuning tools.

**Labels** are -100 on everything but the answers (``train_on_prompt`` trains every token).
Examples longer than ``max_length`` are cut and counted; one whose answer is cut away entirely is
skipped and reported. Rows with an empty answer, no assistant turn, an unknown role or a value of the
wrong type are skipped and listed in ``Prepared.problems`` with their row numbers (1-based, in file
order), so one bad row in ten thousand does not stop a run; a file in which no row is usable is an
error.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from core import chat, safeio
from core.chat import end_of_turn_ids
from core.encoded import IGNORE, Encoded
from core.errors import StudioError

ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
"""Message roles accepted in chat data (lower-cased), mapped to the chat template's three roles."""

PLAIN_TEMPLATE = {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n",
                  "assistant": "### Response:\n", "between": "\n\n"}
"""The template for tokenizers without a chat template: see the module docstring."""


# -- one row -> a conversation --------------------------------------------------------------------

class RowProblem(StudioError):
    """A row that cannot be trained on (empty answer, wrong type, ...); :func:`prepare` skips and
    lists it, :func:`encode` raises it."""


def _text(value, field_name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "" if isinstance(value, float) and math.isnan(value) else str(value)
    raise RowProblem(f"field '{field_name}' is {type(value).__name__}, expected text")


def _content(value) -> str:
    """A message's content: text, or the text parts of a list of parts (``[{"type": "text", ...}]``)."""
    if isinstance(value, list):
        return "".join(p.get("text") or "" for p in value if isinstance(p, dict))
    return _text(value, "content")


def _messages(value, column: str) -> list[dict[str, str]]:
    """A chat column's value as ``[{"role", "content"}]`` with roles mapped to user/assistant/system."""
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = safeio.loads(value, f"field '{column}'")
        except StudioError:
            raise RowProblem(f"field '{column}' is text, expected a list of messages") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowProblem(f"field '{column}' is not a list of messages")
    out = []
    for m in value:
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role is None:
            raise RowProblem(f"a message has no 'role' (or ShareGPT 'from'); its keys: "
                             f"{', '.join(k for k, v in m.items() if v is not None)}")
        mapped = ROLES.get(str(role).lower())
        if mapped is None:
            raise RowProblem(f"unknown role '{role}' (expected user, assistant or system; ShareGPT's human, gpt)")
        out.append({"role": mapped, "content": _content(content)})
    return out


def _conversation(example: Mapping[str, Any], fmt: str, fields: Mapping[str, str]) -> list[dict[str, str]]:
    """Any conversational format as a list of messages ending with an assistant turn."""
    if fmt == "chat":
        msgs = _messages(example.get(fields["messages"]), fields["messages"])
    else:
        get = (lambda role: _text(example.get(fields[role]), fields[role]) if role in fields else "")
        if fmt == "instruction":
            user = get("instruction").strip()
            extra = get("input").strip()
            user = f"{user}\n\n{extra}" if extra else user
            answer = get("output")
        else:
            user, answer = get("prompt"), get("completion")
        system = get("system")
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    while msgs and msgs[-1]["role"] != "assistant":  # trailing questions teach nothing
        msgs.pop()
    if not msgs:
        raise RowProblem("no assistant turn")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise RowProblem("empty answer")
    return msgs


# -- rendering: text plus the character spans to train --------------------------------------------

def _has_template(tokenizer) -> bool:
    return chat.has_template(tokenizer)


def _bos_text(tokenizer) -> str:
    """The BOS token's text when the tokenizer puts one in front of plain text, else ''."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ""
    with_special = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if with_special[:1] == [bos] else ""


def _eos_text(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise StudioError("the tokenizer has no end-of-sequence token, so the model could not learn to stop",
                          hint="choose a model whose tokenizer defines eos_token")
    return tokenizer.eos_token


def _render(tokenizer, messages, generation: bool) -> str:
    return chat.render(tokenizer, messages, generation)


def format_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The text to generate an answer from: the conversation so far, ending where the assistant's
    answer starts, rendered exactly as in training (chat template or :data:`PLAIN_TEMPLATE`, BOS
    included where training has one). Tokenise it with ``add_special_tokens=False``, or use
    :func:`prompt_ids`."""
    msgs = [{"role": ROLES.get(str(m["role"]).lower(), m["role"]), "content": m["content"]} for m in messages]
    if _has_template(tokenizer):
        return _render(tokenizer, msgs, True)
    text, _ = _plain(tokenizer, msgs + [{"role": "assistant", "content": ""}], _bos_text(tokenizer))
    return text[: len(text) - len(_eos_text(tokenizer))]


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """:func:`format_prompt` as token ids: the same ids a training example has before its answer."""
    return list(tokenizer(format_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def _plain(tokenizer, messages, bos: str) -> tuple[str, list[tuple[int, int]]]:
    """Render with :data:`PLAIN_TEMPLATE`: (text, spans of the answers including their EOS)."""
    eos = _eos_text(tokenizer)
    parts = [bos]
    spans = []
    pos = len(bos)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = PLAIN_TEMPLATE["assistant"]
            parts.append(head)
            pos += len(head)
            answer = m["content"] + eos
            parts.append(answer)
            spans.append((pos, pos + len(answer)))
            pos += len(answer)
            if i < len(messages) - 1:
                parts.append(PLAIN_TEMPLATE["between"])
                pos += len(PLAIN_TEMPLATE["between"])
        else:
            piece = PLAIN_TEMPLATE[m["role"]].format(content=m["content"])
            parts.append(piece)
            pos += len(piece)
    return "".join(parts), spans


def _with_template(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template: (text, spans of the assistant turns that can be trained), by
    :func:`core.chat.answer_spans`; a conversation it cannot train is a :class:`RowProblem`."""
    try:
        return chat.answer_spans(tokenizer, messages)
    except chat.TemplateProblem as e:
        raise RowProblem(str(e)) from None


def _rendered(example, tokenizer, fmt, fields, bos: str) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, answer spans, template) for one row; ``template``: spans came from a chat template."""
    if fmt == "text":
        text = _text(example.get(fields["text"]), fields["text"])
        if not text.strip():
            raise RowProblem("empty text")
        full = bos + text + _eos_text(tokenizer)
        return full, [(len(bos), len(full))], False
    if fmt == "prompt-completion" and not _has_template(tokenizer):
        prompt = _text(example.get(fields["prompt"]), fields["prompt"])
        answer = _text(example.get(fields["completion"]), fields["completion"])
        if not answer.strip():
            raise RowProblem("empty answer")
        head = bos + prompt
        full = head + answer + _eos_text(tokenizer)
        return full, [(len(head), len(full))], False
    messages = _conversation(example, fmt, fields)
    if _has_template(tokenizer):
        text, spans = _with_template(tokenizer, messages)
        return text, spans, True
    text, spans = _plain(tokenizer, messages, bos)
    return text, spans, False


def _labels_for(ids: list[int], offsets, spans, end_ids: set[int], eos_id: int | None,
                template: bool, text: str = "") -> tuple[list[int], list[int]]:
    """Token labels from character spans: a token is trained when it starts inside a span. In each
    span, the answer ends at its end-of-turn token (:func:`core.chat.answer_end`: what follows it is
    not trained); a template span with no such token gets the EOS inserted after its last token."""
    trained = [False] * len(ids)
    inserts: list[int] = []
    k = 0
    n = len(ids)
    def blank(j: int) -> bool:  # white space only (ChatML's "\n" after <|im_end|>); asked only at a span's tail
        return bool(text) and not text[offsets[j][0]:offsets[j][1]].strip()

    for a, b in spans:
        while k < n and offsets[k][0] < a:
            k += 1
        first = k
        while k < n and offsets[k][0] < b:
            k += 1
        members = range(first, k)
        if not members:
            continue
        last_end = chat.answer_end(ids, first, k, end_ids, blank)
        if last_end is None:
            stop = k
            if template and eos_id is not None:
                inserts.append(stop)  # the template wrote no stop token: teach one anyway
        else:
            stop = last_end + 1
        for j in range(first, stop):
            trained[j] = True
    labels = [t if m else IGNORE for t, m in zip(ids, trained)]
    for at in reversed(inserts):
        ids = ids[:at] + [eos_id] + ids[at:]
        labels = labels[:at] + [eos_id] + labels[at:]
    return ids, labels


def _tokenize(tokenizer, texts: list[str]) -> tuple[list[list[int]], list]:
    """Token ids and character offsets for many texts in one call of the fast tokenizer."""
    if getattr(tokenizer, "is_fast", False):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            # straight to the Rust tokenizer: the same ids and offsets as tokenizer(...), without the
            # wrapper's "longer than the maximum length" warning for examples we cut ourselves
            encs = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encs], [e.offsets for e in encs]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    raise StudioError("this tokenizer is not a fast (Rust) tokenizer, which LoRA Studio needs to find the "
                      "answer's tokens", hint="give the model folder a tokenizer.json")


def _encode_many(examples: Sequence[Mapping[str, Any]], tokenizer, fmt: str, fields: Mapping[str, str], *,
                 max_length: int, train_on_prompt: bool = False,
                 end_ids: set[int] | None = None) -> list[Encoded | RowProblem]:
    """Encode rows in one tokenizer call; a row that cannot be trained is a :class:`RowProblem`.
    ``end_ids``: end_of_turn_ids(tokenizer), given once for many calls (it reads the whole vocabulary)."""
    bos = _bos_text(tokenizer)
    end_ids = set(end_of_turn_ids(tokenizer)) if end_ids is None else end_ids
    eos_id = tokenizer.eos_token_id
    rendered: list[Any] = []
    for ex in examples:
        try:
            rendered.append(_rendered(ex, tokenizer, fmt, fields, bos))
        except RowProblem as e:
            rendered.append(e)
    texts = [r[0] for r in rendered if not isinstance(r, RowProblem)]
    all_ids, all_offsets = _tokenize(tokenizer, texts) if texts else ([], [])
    out: list[Encoded | RowProblem] = []
    t = 0
    for r in rendered:
        if isinstance(r, RowProblem):
            out.append(r)
            continue
        text, spans, template = r
        ids, labels = _labels_for(list(all_ids[t]), all_offsets[t], spans, end_ids, eos_id, template, text)
        t += 1
        if train_on_prompt:
            labels = list(ids)
        truncated = len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            out.append(RowProblem(f"the prompt alone fills --max-length {max_length}; nothing left to train"))
            continue
        out.append(Encoded(ids, labels, truncated))
    return out


def encode(example: Mapping[str, Any], tokenizer, fmt: str, fields: Mapping[str, str], *, max_length: int,
           train_on_prompt: bool = False, chat_template: str = "auto") -> Encoded:
    """Render one row and tokenise it: ``input_ids`` and ``labels`` (-100 except on the answers and
    their end-of-turn token, or everywhere with ``train_on_prompt``), cut at ``max_length``;
    ``chat_template`` as ``DataConfig.chat_template``.

    Raises :class:`RowProblem` (a :class:`StudioError`) for a row that cannot be trained on."""
    tokenizer = chat.with_template(tokenizer, chat_template)
    result = _encode_many([example], tokenizer, fmt, fields, max_length=max_length,
                          train_on_prompt=train_on_prompt)[0]
    if isinstance(result, RowProblem):
        raise result
    return result


def render_marked(encoded: Encoded, tokenizer) -> list[tuple[str, bool]]:
    """The example as text pieces, each with whether its tokens are trained; special tokens
    (``<|im_end|>``) are kept visible. Consecutive tokens of the same kind are decoded together."""
    pieces: list[tuple[str, bool]] = []
    ids, labels = list(encoded.input_ids), list(encoded.labels)
    i = 0
    while i < len(ids):
        trained = labels[i] != IGNORE
        j = i
        while j < len(ids) and (labels[j] != IGNORE) == trained:
            j += 1
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append((text, trained))
        i = j
    return pieces


UNDERLINE = ("\x1b[4m", "\x1b[24m")
BRACKETS = ("⟦", "⟧")


def render_text(encoded: Encoded, tokenizer, *, style: str = "auto", stream=None) -> str:
    """:func:`render_marked` as plain text for a terminal: trained pieces underlined (``style="ansi"``)
    or between ⟦ ⟧ (``"brackets"``); ``"auto"`` underlines when ``stream`` (stdout) is a terminal."""
    if style == "auto":
        stream = stream if stream is not None else sys.stdout
        style = "ansi" if getattr(stream, "isatty", lambda: False)() else "brackets"
    on, off = UNDERLINE if style == "ansi" else BRACKETS
    out = []
    for text, trained in render_marked(encoded, tokenizer):
        if not trained:
            out.append(text)
        elif style == "ansi":  # underline line by line, so a terminal never carries it past a newline
            out.append("\n".join(f"{on}{line}{off}" if line else line for line in text.split("\n")))
        else:
            out.append(f"{on}{text}{off}")
    return "".join(out)
