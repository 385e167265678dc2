"""Text generation for the playground: one token at a time, with a callback per piece and a stop flag.

``transformers``' ``model.generate`` can stream through a ``TextIteratorStreamer``, but it owns the
loop: stopping it from another thread needs a ``StoppingCriteria`` and the streamer's queue, and the
partial text of a cancelled answer is lost in its buffer. The loop here is the plain one (the shape of
nanoGPT's ``generate``): one forward pass over the prompt, then one per new token with the KV cache,
so the caller sees every piece as soon as it exists and a ``stop()`` is honoured within one token.

Decoding rules, so that two answers to the same prompt are comparable:

* ``temperature <= 0`` (or ``greedy=True``) is greedy: argmax, deterministic, no random numbers used;
* otherwise the logits are divided by ``temperature``, cut to the smallest set of tokens whose
  probability reaches ``top_p`` (nucleus sampling, Holtzman et al., arXiv:1904.09751, section 3.1),
  and sampled with a generator seeded by ``seed``, so the same seed gives the same text;
* generation ends at the first end-of-sequence or end-of-turn token (the tokenizer's EOS, the
  model's ``generation_config.eos_token_id``, and chat end markers such as ``<|im_end|>``), after
  ``max_new_tokens``, when the context window is full, or when ``stop()`` returns True.

Pieces are produced by decoding the whole answer so far and emitting the new suffix: byte-level BPE
tokens can split one UTF-8 character, so a suffix ending in U+FFFD is held back until the next token
completes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from core.chat import END_OF_TURN, end_of_turn_ids, has_template
from core.errors import StudioError

END_OF_TURN_TOKENS = END_OF_TURN
"""The chat end markers of :data:`core.chat.END_OF_TURN` (the one list training uses too). Any of them
that the tokenizer knows as one token ends an answer."""

@dataclass
class Generation:
    """The outcome of one :func:`generate_with_details` call."""

    text: str
    """The answer (special tokens removed, the end-of-turn token not included)."""
    token_ids: list[int] = field(default_factory=list)
    """The new token ids, without the final end-of-turn token."""
    prompt_tokens: int = 0
    """How many tokens the formatted prompt had."""
    stop_reason: str = "length"
    """``eos`` (an end-of-sequence or end-of-turn token), ``length`` (max_new_tokens or the context
    window), or ``cancelled`` (``stop()`` returned True)."""
    seconds: float = 0.0
    """Wall time of the whole call, prompt pass included."""

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (then prompts are formatted as a user turn)."""
    return has_template(tokenizer)


def format_prompt(tokenizer, prompt, *, chat: bool | None = None, system: str | None = None,
                  as_trained: bool = False) -> list[int]:
    """The token ids the model sees for ``prompt``.

    ``prompt`` is a string or a list of chat messages (``{"role", "content"}``). With a chat template
    (and ``chat`` not False) a string becomes one user turn, ``system`` becomes a system turn before
    it, and the template's generation prompt (``<|im_start|>assistant\\n`` for ChatML) is appended, as
    the model saw its turns in training. Without a template, messages are joined as plain text, unless
    ``as_trained``: then the prompt is exactly what training put before an answer (``core.data``'s
    plain ``### Instruction`` / ``### Response`` template for a tokenizer without one), for an
    adapter trained that way (``core.chat.tokenizer_as_trained``).
    """
    use_chat = has_chat_template(tokenizer) if chat is None else (chat and has_chat_template(tokenizer))
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        if not all("role" in m and "content" in m for m in messages):
            raise StudioError("each chat message needs a 'role' and a 'content'")
    if system:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    if as_trained:
        from core import data

        ids = data.prompt_ids(tokenizer, messages)
    elif use_chat:
        # Render to text and tokenize it ourselves: apply_chat_template(tokenize=True) returns a list
        # in transformers 4 and a BatchEncoding in 5. The template already holds the special tokens.
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
        ids = tokenizer(text)["input_ids"]
    if not ids:
        raise StudioError("the prompt is empty; type something to generate from")
    return list(ids)


def stop_token_ids(model: nn.Module | None, tokenizer) -> set[int]:
    """Every id that ends an answer: EOS from the tokenizer and the model's configs, and the
    end-of-turn markers of :data:`core.chat.END_OF_TURN` the tokenizer has as single tokens
    (:func:`core.chat.end_of_turn_ids`, the same tokens training ends each answer with)."""
    return set(end_of_turn_ids(tokenizer, model))


def _context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cache_keywords(model: nn.Module) -> tuple[str, bool]:
    """The forward keyword for the KV cache (``cache`` from transformers 5.2x, ``past_key_values``
    before) and whether ``logits_to_keep`` is accepted (then only the last position's logits are
    computed: the prompt pass skips a (prompt × vocab) matmul)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def next_token(logits: torch.Tensor, *, temperature: float, top_p: float,
               generator: torch.Generator | None) -> int:
    """Pick the next token from ``logits`` (vocab,): greedy when temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep a token while the mass *before* it is below top_p: the top token always stays
        keep = (cumulative - sorted_probs) < top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def generate_with_details(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 128,
                          temperature: float = 0.7, top_p: float = 0.9, greedy: bool = False,
                          seed: int | None = 0, chat: bool | None = None, system: str | None = None,
                          stop: Callable[[], bool] | None = None,
                          on_token: Callable[[str], None] | None = None, as_trained: bool = False) -> Generation:
    """Generate an answer to ``prompt`` (a string or chat messages), calling ``on_token(piece)`` with
    each new piece of text as it is decoded and ``stop()`` before each forward pass.

    The model is used as it is (whatever adapters are active or merged); it is put in eval mode for
    the call (LoRA dropout off) and its mode is restored afterwards. A cancelled call returns the
    text produced so far with ``stop_reason == "cancelled"``.
    """
    if max_new_tokens < 1:
        raise StudioError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    if not (0 < top_p <= 1):
        raise StudioError(f"top-p must be in (0, 1] (got {top_p})")
    started = time.perf_counter()
    ids = format_prompt(tokenizer, prompt, chat=chat, system=system, as_trained=as_trained)
    limit = _context_length(model)
    if limit is not None:
        if len(ids) >= limit:
            raise StudioError(f"the prompt has {len(ids)} tokens; this model reads at most {limit}",
                              hint="shorten the prompt")
        max_new_tokens = min(max_new_tokens, limit - len(ids))
    stops = stop_token_ids(model, tokenizer)
    device = _model_device(model)
    temperature = 0.0 if greedy else float(temperature)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed) if seed is not None else int(time.time_ns() % (2 ** 63)))

    result = Generation(text="", prompt_tokens=len(ids))
    emitted = ""
    was_training = model.training
    model.eval()
    try:
        # no_grad rather than inference_mode: inference tensors may not be used outside inference mode
        # later, and a layer may keep a tensor of a call (core.lora's shared-input cache keeps x and
        # reads its version counter, which inference tensors do not have); the gain is negligible here
        with torch.no_grad():
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            cache_kw, keep_kw = _cache_keywords(model)
            extra = {"logits_to_keep": 1} if keep_kw else {}
            past = None
            for _ in range(max_new_tokens):
                if stop is not None and stop():
                    result.stop_reason = "cancelled"
                    break
                out = model(input_ids=input_ids, use_cache=True, **{cache_kw: past}, **extra)
                past = out.get("cache", None) if cache_kw == "cache" else out.past_key_values
                token = next_token(out.logits[0, -1], temperature=temperature, top_p=top_p, generator=generator)
                if token in stops:
                    result.stop_reason = "eos"
                    break
                result.token_ids.append(token)
                text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(emitted) and text.startswith(emitted):
                    piece, emitted = text[len(emitted):], text
                    if on_token is not None:
                        on_token(piece)
                elif not text.startswith(emitted):
                    emitted = text  # a rare re-segmentation of earlier bytes; keep going from here
                input_ids = torch.tensor([[token]], dtype=torch.long, device=device)
            else:
                result.stop_reason = "length"
    finally:
        if was_training:
            model.train()
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if on_token is not None and text.startswith(emitted) and len(text) > len(emitted):
        on_token(text[len(emitted):])  # whatever was held back as an incomplete character
    result.text = text
    result.seconds = time.perf_counter() - started
    return result


def generate(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, greedy: bool = False, seed: int | None = 0, chat: bool | None = None,
             system: str | None = None, stop: Callable[[], bool] | None = None,
             on_token: Callable[[str], None] | None = None) -> str:
    """The answer's text; see :func:`generate_with_details` for the arguments and the rules."""
    return generate_with_details(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, greedy=greedy, seed=seed, chat=chat,
                                 system=system, stop=stop, on_token=on_token).text
