"""Chat templates and end-of-turn tokens: one place for what training and generation must agree on.

**End of turn.** :data:`END_OF_TURN` is the one list of the tokens that end an assistant turn in the
chat templates the common families publish. Training (``core.data``) teaches the model to write the
one that ends each answer; generation (``core.generate``) stops at any of them. Before this module
each kept its own list, and the two had drifted (Llama 3's ``<|eom_id|>`` stopped nothing).

=============================  ==============================  ================================
family (chat template)         an assistant turn ends with     then
=============================  ==============================  ================================
Qwen2/2.5/3, SmolLM (ChatML)   ``<|im_end|>``                  ``\\n``
Llama 3.x                      ``<|eot_id|>`` (tools:          nothing
                               ``<|eom_id|>``)
Gemma 2/3                      ``<end_of_turn>``               ``\\n``
Phi-3/3.5                      ``<|end|>``                     ``\\n`` and, last, the EOS
Mistral ([INST] ... [/INST])   the EOS ``</s>``                nothing
OLMo 2 / Tülu                  the EOS ``<|endoftext|>``       ``\\n`` between turns
Granite 3                      ``<|end_of_text|>``             ``\\n``
Command-R (Cohere)             ``<|END_OF_TURN_TOKEN|>``       nothing
=============================  ==============================  ================================

An answer's trained tokens end at its end-of-turn token: the first one in the turn's text after which
only white space and other end tokens follow (:func:`answer_end`), so Phi-3's ``<|end|>`` is the
last trained token, not the EOS its template appends after the conversation, and an answer that
merely mentions ``<|im_end|>`` mid-text is trained to its real end.

**A model without a chat template** gets a choice, never a silent default (:data:`CHOICES`): the
plain ``### Instruction`` / ``### Response`` template (``plain``, what ``core.data`` documents as
``PLAIN_TEMPLATE``), ChatML (``chatml``, the most widely used template, whose markers are plain text
to a tokenizer that lacks them), or a Jinja template file of the user's (the ``chat_template.jinja``
a model publishes). ``auto`` keeps the tokenizer's own template, and for a tokenizer without one
means ``plain``, which :func:`describe` says in words for the window and the command line.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from core.errors import StudioError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
               "<|end_of_text|>", "</s>", "<|END_OF_TURN_TOKEN|>")
"""Tokens that end an assistant turn in common chat templates (besides the tokenizer's EOS): ChatML's
(Qwen, SmolLM), Llama 3's two, Gemma's, Phi-3's, GPT-2/NeoX/OLMo's EOS, Granite's and Llama 3 base's,
Llama 2/Mistral's EOS, Command-R's. A tokenizer uses the ones it has as single tokens."""

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
"""ChatML, as SmolLM2-Instruct and Qwen publish it without their default system prompt."""

CHOICES = {
    "auto": "the model's own chat template (plain text when it has none)",
    "plain": "plain text: ### Instruction / ### Response, the answer ending with the EOS",
    "chatml": "ChatML: <|im_start|>role ... <|im_end|>",
}
"""What ``DataConfig.chat_template`` may be, besides the path of a ``.jinja`` file."""

STYLES = (  # (name, a marker the template text contains, words for people)
    ("chatml", "<|im_start|>", "ChatML (<|im_start|> … <|im_end|>)"),
    ("llama3", "<|start_header_id|>", "Llama 3 (<|start_header_id|> … <|eot_id|>)"),
    ("gemma", "<start_of_turn>", "Gemma (<start_of_turn> … <end_of_turn>)"),
    ("granite", "<|start_of_role|>", "Granite (<|start_of_role|> … <|end_of_text|>)"),
    ("phi3", "<|end|>", "Phi-3 (<|user|> … <|end|>)"),
    ("tulu", "<|assistant|>", "Tülu/OLMo 2 (<|user|> … EOS)"),
    ("mistral", "[INST]", "Mistral/Llama 2 ([INST] … [/INST] … EOS)"),
    ("command-r", "<|START_OF_TURN_TOKEN|>", "Command-R (<|START_OF_TURN_TOKEN|> … <|END_OF_TURN_TOKEN|>)"),
)


def has_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def template_style(template: str | None) -> str | None:
    """The family a chat template's text is written in (a name of :data:`STYLES`), or None."""
    if not template:
        return None
    text = template.replace('"', "'")
    for name, marker, _ in STYLES:
        if marker.replace('"', "'") in text:
            return name
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [i for v in value for i in _ids(v)]
    return [int(value)]


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends an answer, in a stable order: the tokenizer's EOS, the model's
    ``generation_config`` and ``config`` EOS ids (Llama 3 Instruct lists ``<|eot_id|>`` there), and
    the tokens of :data:`END_OF_TURN` the tokenizer has as single tokens."""
    ids: list[int] = []
    found = _ids(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        found += _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
        found += _ids(getattr(getattr(model, "config", None), "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    found += [int(vocab[t]) for t in END_OF_TURN if t in vocab]
    for i in found:
        if i not in ids:
            ids.append(i)
    return ids


def answer_end(ids: Sequence[int], first: int, stop: int, end_ids: set[int],
               blank: Callable[[int], bool]) -> int | None:
    """The index of the token that ends the answer in ``ids[first:stop]``: the first end-of-turn token
    after which only white space and end-of-turn tokens follow; None when there is none.

    ``blank(j)`` says whether token ``j``'s text is white space only (asked from the end backwards,
    only until the answer's last word)."""
    end = None
    for j in range(stop - 1, first - 1, -1):
        if ids[j] in end_ids:
            end = j
        elif not blank(j):
            break
    return end


def _read_template_file(path: str) -> str:
    p = Path(path).expanduser()
    if p.suffix.lower() not in (".jinja", ".j2", ".txt"):
        raise StudioError(f"--chat-template {path}: not one of {', '.join(CHOICES)} and not a .jinja file",
                          hint="give auto, plain, chatml or the path of a chat_template.jinja")
    if not p.is_file():
        raise StudioError(f"--chat-template {path}: no such file", hint="give the path of a chat_template.jinja")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StudioError(f"--chat-template {path}: cannot be read ({e})") from None
    if "messages" not in text:
        raise StudioError(f"--chat-template {path}: not a chat template (it never mentions 'messages')",
                          hint="a chat template loops over messages, like a model's chat_template.jinja")
    return text


def choice_problem(choice: str | None) -> str | None:
    """Why ``choice`` is not a valid ``chat_template`` setting, as one line; None when it is."""
    if not choice or choice in CHOICES:
        return None
    try:
        _read_template_file(choice)
    except StudioError as e:
        return str(e)
    return None


def with_template(tokenizer, choice: str | None):
    """``tokenizer`` rendering conversations as ``choice`` says (see the module docstring): the same
    object for ``auto``, else a shallow copy with its ``chat_template`` replaced (None for ``plain``).
    The caller's tokenizer is never changed."""
    if not choice or choice == "auto":
        return tokenizer
    template = None if choice == "plain" else CHATML if choice == "chatml" else _read_template_file(choice)
    if getattr(tokenizer, "chat_template", None) == template:
        return tokenizer
    tok = copy.copy(tokenizer)
    tok.chat_template = template
    return tok


def describe(tokenizer, choice: str | None = "auto") -> str:
    """How conversations are rendered for training with ``choice``, in one line for people."""
    if choice and choice not in ("auto",):
        if choice in CHOICES:
            return f"conversations are rendered as {CHOICES[choice]} (chosen)"
        return f"conversations are rendered with the chat template {os.path.basename(choice)} (chosen)"
    if not has_template(tokenizer):
        return ("this model has no chat template: conversations are rendered as plain text (### Instruction / "
                "### Response); choose ChatML or a template file instead if the model will be chatted with")
    style = template_style(tokenizer.chat_template)
    label = next((words for name, _, words in STYLES if name == style), "its own format")
    return f"conversations are rendered with the model's chat template: {label}"


class TemplateProblem(StudioError):
    """A conversation the chat template refuses or cannot render as prompt + answer."""


def render(tokenizer, messages, generation: bool) -> str:
    """``messages`` as text through the tokenizer's chat template (``generation``: end with the
    template's generation prompt, where the assistant's answer starts)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _agreed_end(upto: str, full: str, start: int, enders: Sequence[str]) -> int:
    """Where a turn rendered as the last one (``upto``) stops agreeing with the whole conversation
    (``full``), cut back to just after the last end-of-turn token before that point and the white space
    following it (a character-wise prefix would end inside a special token: ``<|end|>\n<|`` is common
    to ``...<|endoftext|>`` and ``...<|user|>``). ``start`` when no end-of-turn token is there."""
    n = min(len(upto), len(full))
    i = 0
    while i < n and upto[i] == full[i]:
        i += 1
    cut = max((full.rfind(t, start, i) + len(t) for t in enders if full.rfind(t, start, i) >= 0), default=start)
    while cut < i and full[cut].isspace():
        cut += 1
    return cut


def answer_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the chat template, and the character spans of the assistant
    turns that can be trained.

    Turn ``i`` is the text between ``render(messages[:i], generation=True)`` (the prompt, which must
    be a prefix of the whole) and the point where ``render(messages[:i + 1])`` stops agreeing with the
    whole conversation, provided that part holds the whole answer. Phi-3's template closes a
    conversation with the EOS, so a turn rendered as the last one ends ``<|end|>\\n<|endoftext|>`` but
    inside the conversation ``<|end|>\\n<|user|>``: the turn is trained up to where the two agree. A
    template that renders an earlier turn differently once later turns follow (Qwen3 drops an earlier
    answer's reasoning block) leaves that turn as untrained context. Raises :class:`TemplateProblem`.
    """
    enders = [t for t in (*END_OF_TURN, getattr(tokenizer, "eos_token", None)) if t]
    try:
        full = render(tokenizer, messages, False)
        spans = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(tokenizer, messages[:i], True)
            upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], False)
            end = len(upto) if full.startswith(upto) else _agreed_end(upto, full, len(prompt), enders)
            whole = end == len(upto) or m["content"].strip() in full[len(prompt):end]
            if len(prompt) >= pos and full.startswith(prompt) and end > len(prompt) and whole:
                spans.append((len(prompt), end))
                pos = end
    except StudioError:
        raise
    except Exception as e:  # jinja2 raises TemplateError (e.g. "roles must alternate"), others ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TemplateProblem(f"the chat template refused this conversation ({first})") from None
    if not spans:
        raise TemplateProblem("the chat template does not render this conversation as prompt + answer")
    return full, spans


def rendering_record(tokenizer, choice: str | None) -> dict:
    """What a trained adapter's ``studio.json`` records (under ``dataset``) about how its
    conversations were rendered, so that generation can render prompts the same way:
    ``{"chat_template": "model" | "plain" | "chatml" | "file"}``, and for a file its Jinja text
    (``chat_template_text``: the file may be gone by the time the adapter is used)."""
    choice = choice or "auto"
    if choice == "auto":
        return {"chat_template": "model" if has_template(tokenizer) else "plain"}
    if choice in CHOICES:
        return {"chat_template": choice}
    return {"chat_template": "file", "chat_template_text": _read_template_file(choice)}


def tokenizer_as_trained(tokenizer, dataset: dict | None):
    """``tokenizer`` rendering conversations as the adapter whose ``studio.json`` ``dataset`` is
    ``dataset`` was trained (see :func:`rendering_record`); None when the adapter records nothing
    (written by PEFT or before this was recorded)."""
    kind = (dataset or {}).get("chat_template")
    if kind == "model":
        return tokenizer
    if kind in ("plain", "chatml"):
        return with_template(tokenizer, kind)
    text = (dataset or {}).get("chat_template_text")
    if kind == "file" and isinstance(text, str) and text:
        tok = copy.copy(tokenizer)
        tok.chat_template = text
        return tok
    return None


def tokenizer_for_adapter(tokenizer, folder) -> Any:
    """:func:`tokenizer_as_trained` for the adapter in ``folder`` (its ``studio.json``); None when the
    folder records nothing about it or cannot be read."""
    import json

    try:
        studio = json.loads((Path(folder) / "studio.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    dataset = studio.get("dataset") if isinstance(studio, dict) else None
    return tokenizer_as_trained(tokenizer, dataset if isinstance(dataset, dict) else None)
