"""Ollama: the ``Modelfile`` written beside a GGUF export, and ``ollama create`` when it is installed.

Ollama does not run Jinja chat templates; a Modelfile's ``TEMPLATE`` is a Go template over
``.Messages``. Rather than translating arbitrary Jinja, the model's own chat template is *rendered*
(with transformers) on probe conversations and compared with what each known family's Go template
renders (each family below has its Go template and, beside it, a Python function that produces
exactly the text that template produces). The family whose rendering matches is written; a template
that matches none is left out, with a comment, and Ollama falls back to its own detection from the
chat template stored in the GGUF metadata.

Families: ChatML (SmolLM2, Qwen2, Qwen2.5, Qwen3 without tools), Llama 3, Gemma (2 and 3),
Phi-3, Mistral ``[INST]``. The BOS token is not part of a template: llama.cpp adds it itself when
the file says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.errors import StudioError


@dataclass(frozen=True)
class ChatFamily:
    name: str
    go: str
    render: Callable[[list[dict]], str]
    """What ``go`` renders for these messages, followed by the generation prompt."""
    stops: tuple[str, ...]
    system: bool = True
    """Whether the family has a system role of its own (probed with one)."""


def _chatml(msgs: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"


def _llama3(msgs: list[dict]) -> str:
    return ("".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _gemma(msgs: list[dict]) -> str:
    role = {"assistant": "model"}
    return ("".join(f"<start_of_turn>{role.get(m['role'], 'user')}\n{m['content']}<end_of_turn>\n" for m in msgs)
            + "<start_of_turn>model\n")


def _phi3(msgs: list[dict]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in msgs) + "<|assistant|>\n"


def _mistral(msgs: list[dict]) -> str:
    return "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else f"{m['content']}</s>" for m in msgs)


FAMILIES = (
    ChatFamily("chatml", '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                         '{{ end }}<|im_start|>assistant\n', _chatml, ("<|im_end|>", "<|im_start|>")),
    ChatFamily("llama3", '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                         '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
               _llama3, ("<|eot_id|>", "<|start_header_id|>")),
    ChatFamily("gemma", '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user'
                        '{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n',
               _gemma, ("<end_of_turn>",), system=False),
    ChatFamily("phi3", '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
               _phi3, ("<|end|>", "<|user|>", "<|assistant|>")),
    ChatFamily("mistral", '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
                          '{{ else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}',
               _mistral, ("[INST]", "[/INST]"), system=False),
)

_PROBES = ([{"role": "user", "content": "Hello there"}],
           [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}])
_SYSTEM = {"role": "system", "content": "You answer briefly."}


def _render(tokenizer, msgs: list[dict]) -> str | None:
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses this conversation (Gemma 2 and a system role, say)
        return None
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text


def chat_family(tokenizer) -> tuple[ChatFamily | None, str | None]:
    """The family whose Go template renders like the model's chat template, and the default system
    prompt the template adds when a conversation has none (SmolLM2's, Qwen2.5's), if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None, None
    got = [_render(tokenizer, p) for p in _PROBES]
    for fam in FAMILIES:
        default = None
        if got[0] is not None and got[0] != fam.render(_PROBES[0]) and fam.system \
                and got[0].endswith(fam.render(_PROBES[0])):
            default = _system_text(fam, got[0][: len(got[0]) - len(fam.render(_PROBES[0]))])
        lead = [{"role": "system", "content": default}] if default is not None else []
        if any(g != fam.render(lead + p) for g, p in zip(got, _PROBES)):
            continue
        if fam.system:
            with_system = [_SYSTEM] + _PROBES[1]
            if _render(tokenizer, with_system) != fam.render(with_system):
                continue
        return fam, default
    return None, None


def _system_text(fam: ChatFamily, prefix: str) -> str | None:
    """The content of a default system turn ``prefix`` rendered by ``fam``, else None."""
    marker = fam.render([{"role": "system", "content": "\x00"}])
    tail = fam.render([])
    head, _, rest = marker.partition("\x00")
    end = rest[: len(rest) - len(tail)] if tail and rest.endswith(tail) else rest
    if prefix.startswith(head) and prefix.endswith(end) and len(prefix) >= len(head) + len(end):
        return prefix[len(head): len(prefix) - len(end)]
    return None


def _quote(text: str) -> str:
    if '"""' in text:
        raise StudioError('the system prompt contains """, which a Modelfile cannot hold')
    return f'"""{text}"""'


def modelfile(from_path: str, folder: Path, *, adapter: str | None = None, system: str | None = None,
              sampling: dict | None = None) -> str:
    """The Modelfile for the GGUF at ``from_path`` (relative to the Modelfile), with the chat template,
    stops, system prompt and sampling settings of the checkpoint in ``folder``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    fam, default_system = chat_family(tokenizer)
    lines = ["# Written by LoRA Studio. Run:  ollama create NAME -f Modelfile  then  ollama run NAME",
             f"FROM {from_path}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if fam is not None:
        lines.append(f'TEMPLATE """{fam.go}"""')
        for stop in fam.stops:
            lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    else:
        lines.append("# The chat template matched none this export translates (ChatML, Llama 3, Gemma, Phi-3, "
                     "Mistral); Ollama takes it from the GGUF metadata instead.")
    for key, value in (sampling or {}).items():
        if key in ("temperature", "top_p", "top_k", "repeat_penalty", "num_ctx", "seed", "num_predict") and value is not None:
            lines.append(f"PARAMETER {key} {value}")
    text = system if system else default_system
    if text:
        lines.append(f"SYSTEM {_quote(text)}")
    return "\n".join(lines) + "\n"


def ollama_available() -> bool:
    return shutil.which("ollama") is not None


def create(name: str, modelfile_path: Path, timeout: float = 1800) -> str:
    """``ollama create NAME -f Modelfile``; returns its output, or one line saying why it failed."""
    exe = shutil.which("ollama")
    if exe is None:
        raise StudioError("ollama is not on the PATH", hint="install it from https://ollama.com, or skip this step")
    try:
        done = subprocess.run([exe, "create", name, "-f", str(modelfile_path)], cwd=str(Path(modelfile_path).parent),
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StudioError(f"ollama create {name}: {e}") from None
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        last = output.splitlines()[-1] if output else f"exit code {done.returncode}"
        raise StudioError(f"ollama create {name} failed: {last}")
    return output
