"""Write ``resources/sample_dataset.jsonl``: the project's own sample dataset.

The task: a coffee order in plain English -> one strict JSON object with fixed keys::

    user:      Can I get two large flat whites with oat milk and an extra shot?
    assistant: {"drink": "flat white", "size": "large", "quantity": 2, "milk": "oat", "extra_shot": true}

Why this task: SmolLM2-135M-Instruct answers an order like a barista would, in prose, and never
produces this object by itself; about 100 LoRA steps on a CPU (batch 4, r=8) teach it the schema,
the singular drink name, number words to integers, ``null`` for what the order does not say, and to
stop after the closing brace. The output is checkable with ``json.loads``, so "before" and "after"
are plain to see in the window's playground.

The file is generated, not hand-written, so it is reproducible and reviewable: the same seed gives
the same bytes. Run ``python resources/make_sample_dataset.py`` (add ``--check`` to verify that the
committed file matches this script). :data:`HELD_OUT` are orders kept out of the file, for showing
the effect of training on orders the model has not seen.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 2026
COUNT = 300
OUT = Path(__file__).resolve().parent / "sample_dataset.jsonl"

DRINKS = {  # singular -> plural
    "latte": "lattes", "cappuccino": "cappuccinos", "flat white": "flat whites", "espresso": "espressos",
    "americano": "americanos", "mocha": "mochas", "macchiato": "macchiatos", "cortado": "cortados",
    "chai latte": "chai lattes", "hot chocolate": "hot chocolates", "matcha latte": "matcha lattes",
    "cold brew": "cold brews",
}
SIZES = ("small", "medium", "large")
MILKS = {  # value -> ways an order says it
    "whole": (" with whole milk", " with regular milk"),
    "skim": (" with skim milk", " with skimmed milk"),
    "oat": (" with oat milk", " made with oat milk"),
    "almond": (" with almond milk", " made with almond milk"),
    "soy": (" with soy milk", " made with soy milk"),
    "none": (", no milk", " with no milk", ", black"),
}
SHOT = (" and an extra shot", ", extra shot", " plus an extra shot")
NUMBERS = {1: ("one", "1"), 2: ("two", "2"), 3: ("three", "3"), 4: ("four", "4")}
TEMPLATES = (
    "Can I get {q} {item}{milk}{shot}?",
    "I'd like {q} {item}{milk}{shot}, please.",
    "Could you make me {q} {item}{milk}{shot}?",
    "{Q} {item}{milk}{shot} to go.",
    "Let me have {q} {item}{milk}{shot}.",
    "We'll take {q} {item}{milk}{shot}.",
    "Hi! {Q} {item}{milk}{shot}, thanks.",
    "One more order: {q} {item}{milk}{shot}.",
)

HELD_OUT = (
    "Could you make me three medium cappuccinos with almond milk?",
    "Let me have a large americano, no milk, plus an extra shot.",
    "Hi! Two hot chocolates made with soy milk, thanks.",
)
"""Orders not in the file, to compare the model before and after training."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def order(rng: random.Random) -> tuple[str, dict]:
    """One order sentence and the object it means."""
    drink = rng.choice(list(DRINKS))
    quantity = rng.choices((1, 2, 3, 4), weights=(5, 3, 1, 1))[0]
    size = rng.choice(SIZES) if rng.random() < 0.8 else None
    milk = rng.choice(list(MILKS)) if rng.random() < 0.7 else None
    shot = rng.random() < 0.3
    name = drink if quantity == 1 else DRINKS[drink]
    item = f"{size} {name}" if size else name
    if quantity == 1:
        q = rng.choice((_article(item), "one", "1"))
    else:
        q = rng.choice(NUMBERS[quantity])
    text = rng.choice(TEMPLATES).format(q=q, Q=q[0].upper() + q[1:], item=item,
                                        milk=rng.choice(MILKS[milk]) if milk else "",
                                        shot=rng.choice(SHOT) if shot else "")
    if not milk and shot:
        text = text.replace(" and an extra shot", " with an extra shot", 1)
    return text, {"drink": drink, "size": size, "quantity": quantity, "milk": milk, "extra_shot": shot}


def examples(count: int = COUNT, seed: int = SEED) -> list[dict]:
    """``count`` distinct orders as chat rows (``messages``), none of them in :data:`HELD_OUT`."""
    rng = random.Random(seed)
    seen = set(HELD_OUT)
    rows = []
    while len(rows) < count:
        text, obj = order(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": json.dumps(obj)}]})
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    p.add_argument("--out", type=Path, default=OUT, help=f"where to write (default: {OUT})")
    args = p.parse_args(argv)
    text = render(examples())
    if args.check:
        ok = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if ok else 'differs from the generator'}")
        return 0 if ok else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {COUNT} examples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
