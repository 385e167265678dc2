"""What a run is made of: the model, the LoRA adapter, the data and the training settings.

Each part is a dataclass with a docstring under every field (litgpt's ``args.py`` style). A
:class:`RunConfig` round-trips through JSON exactly (``config.json`` in a run folder) and
:meth:`RunConfig.validate` collects every problem before raising once, so the window can show all of
them together and the command line can print them as one message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import ConfigError, StudioError

PRESETS = ("attention-qv", "attention", "mlp", "all-linear")
SCHEDULERS = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZE = ("none", "nf4", "int8")
"""What ``--quantize`` accepts (core.quant does the work; the list lives here, where reading a
config or building the window imports no torch)."""
QUANTIZE_LABELS = {"none": "none", "nf4": "nf4 (4-bit)", "int8": "int8 (8-bit)"}
"""How the window names them."""
QUANTIZE_PIP = "pip install 'bitsandbytes>=0.50'"
"""What ``nf4``/``int8`` need installed (0.50 is the first bitsandbytes to run 4-bit on the CPU)."""
FORMATS = ("auto", "instruction", "chat", "prompt-completion", "text")
MAX_BATCH = 65536
"""The largest ``--batch-size`` accepted (per process; --grad-accum multiplies it without memory)."""
INITS = ("kaiming", "gaussian")


@dataclass
class ModelConfig:
    source: str = "default"
    """``default`` (the bundled SmolLM2-135M-Instruct), a Hugging Face checkpoint folder, a ``.gguf``
    file, or a repo id already in the local Hugging Face cache."""
    device: str = "auto"
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda`` or ``mps``."""
    precision: str = "auto"
    """``auto`` (bf16 on a CUDA card that supports it, else fp16 with loss scaling; fp32 elsewhere),
    ``fp32``, ``bf16`` or ``fp16``."""
    quantize: str = "none"
    """``none``, ``nf4`` or ``int8``: hold the base's linear layers (not the output head, not the
    embeddings) in 4-bit NF4 (QLoRA) or 8-bit with bitsandbytes, computing in ``precision``. A 7B
    base needs ~4 GB in nf4 instead of 14 GB in bf16; the adapter is the same PEFT folder.
    Needs ``pip install bitsandbytes``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time."""
    trust_remote_code: bool = False
    """Allow this model's own Python code to run. Off unless the user turns it on for this model."""


@dataclass
class LoRAConfig:
    targets: str | list[str] = "all-linear"
    """A preset (``attention-qv``, ``attention``, ``mlp``, ``all-linear``), a list of module-name
    suffixes or full names, or a regular expression (a string starting with ``re:``, or containing
    regex characters) matched against qualified module names."""
    rank: int = 8
    """r, the rank of the update B·A. 1-8 for tasks close to what the model already does, 16-64 for
    distant ones."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path never sees it)."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    init: str = "kaiming"
    """How A starts: ``kaiming`` (uniform, PEFT's default) or ``gaussian`` (std 1/r). B starts at zero."""

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclass
class DataConfig:
    path: str = ""
    """The dataset: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ``.txt`` or a ``save_to_disk``
    folder, or a dataset on the Hugging Face Hub (``org/name``). Empty means the bundled sample dataset."""
    split: str = ""
    """A Hub dataset's split (``--data-split``); empty: ``train``, or its only split."""
    subset: str = ""
    """A Hub dataset's configuration (``--data-config``), for one that has several."""
    format: str = "auto"
    """``auto`` (detected), ``instruction``, ``chat``, ``prompt-completion`` or ``text``."""
    fields: dict[str, str] = field(default_factory=dict)
    """Field mapping from the format's roles to the file's column names, e.g.
    ``{"instruction": "question", "output": "answer"}``."""
    max_length: int = 512
    """Examples longer than this many tokens are truncated (and counted)."""
    packing: bool = False
    """Concatenate short examples into full-length sequences (no padding wasted)."""
    train_on_prompt: bool = False
    """Also compute the loss on the prompt's tokens (default: only the answer's)."""
    val_split: float = 0.0
    """Fraction of examples held out for validation, split by the seed."""
    chat_template: str = "auto"
    """How conversations are rendered (``core.chat.CHOICES``): ``auto`` (the model's own chat
    template; plain text when it has none), ``plain``, ``chatml``, or the path of a ``.jinja`` file."""


@dataclass
class TrainConfig:
    steps: int | None = 100
    """Optimizer steps to run. Exactly one of ``steps`` and ``epochs`` is set."""
    epochs: float | None = None
    """Passes over the training split (may be fractional)."""
    batch_size: int = 4
    """Examples per forward pass, per process."""
    grad_accum: int = 1
    """Forward passes accumulated into one optimizer step."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    scheduler: str = "cosine"
    """``constant``, ``linear`` (to zero) or ``cosine`` (to zero), after the warmup."""
    warmup: int = 0
    """Steps of linear warmup from zero to ``lr``."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the adapter's matrices."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this; 0 turns clipping off."""
    eval_every: int = 0
    """Evaluate on the validation split every N steps (0: only at the end, if there is a split)."""
    save_every: int = 50
    """Write a checkpoint every N steps (0: only at stop, pause and the end)."""
    log_every: int = 1
    """Read the loss back from the device every N steps (a sync point on GPUs)."""
    seed: int = 42
    """Seeds the adapter's initialisation, the split, the shuffling and dropout."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


_TYPE_CHECKS = {
    "str": (lambda v: isinstance(v, str), "text"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "float": (_finite, "a number"),
    "int | None": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "a whole number or null"),
    "float | None": (lambda v: v is None or _finite(v), "a number or null"),
    "str | list[str]": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
                        "text or a list of texts"),
    "dict[str, str]": (lambda v: isinstance(v, dict) and all(isinstance(t, str) for t in v.values()),
                       "an object of texts"),
}
"""A config file's value for each field annotation: what passes, and how the message names it."""


def _type_problem(where: str, annotation: Any, value: Any) -> str | None:
    """The problem with a config file's ``value`` for a field of this annotation, or None."""
    check = _TYPE_CHECKS.get(str(annotation))
    if check is None or check[0](value):
        return None
    return f"{where} must be {check[1]} (got {_short(value)})"


@dataclass
class RunConfig:
    """Everything that defines one training run; ``config.json`` in the run folder is this, as JSON."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = ""
    """The run folder."""
    name: str = ""
    """A name for the run and its adapter in the library (default: the run folder's name)."""

    # -- JSON round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "RunConfig":
        """Build from a dict, refusing unknown keys (a typo in a config file is a problem, not a no-op)."""
        if not isinstance(d, dict):
            raise StudioError(f"{source}: expected a JSON object at the top level")
        problems: list[str] = []
        parts = {"model": ModelConfig, "lora": LoRAConfig, "data": DataConfig, "train": TrainConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in parts:
                if not isinstance(value, dict):
                    problems.append(f"{source}: '{key}' must be an object")
                    continue
                known = {f.name: f for f in fields(parts[key])}
                unknown = sorted(set(value) - set(known))
                if unknown:
                    problems.append(f"{source}: unknown option(s) {', '.join(key + '.' + u for u in unknown)}")
                wrong = [_type_problem(f"{source}: {key}.{k}", known[k].type, v) for k, v in value.items() if k in known]
                problems += [w for w in wrong if w]
                kwargs[key] = parts[key](**{k: v for k, v in value.items() if k in known})
            elif key in ("out", "name"):
                if not isinstance(value, str):
                    problems.append(f"{source}: '{key}' must be text (got {_short(value)})")
                kwargs[key] = value
            else:
                problems.append(f"{source}: unknown option '{key}'")
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        from core import atomic

        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        from core import safeio

        path = Path(path)
        d = safeio.read_json(path)
        return cls.from_dict(d, source=str(path))

    def copy(self) -> "RunConfig":
        return RunConfig.from_dict(json.loads(json.dumps(self.to_dict())))

    # -- validation ------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with this configuration, each naming the option (as on the command line)."""
        p: list[str] = []
        m, lo, da, tr = self.model, self.lora, self.data, self.train
        if not m.source:
            p.append("--model: choose a base model")
        if m.device not in DEVICES:
            p.append(f"--device: '{m.device}' is not one of {', '.join(DEVICES)}")
        if m.precision not in PRECISIONS:
            p.append(f"--precision: '{m.precision}' is not one of {', '.join(PRECISIONS)}")
        if m.quantize not in QUANTIZE:
            p.append(f"--quantize: '{m.quantize}' is not one of {', '.join(QUANTIZE)}")
        if not isinstance(lo.rank, int) or lo.rank < 1:
            p.append(f"--rank: must be a whole number of at least 1 (got {lo.rank!r})")
        elif lo.rank > 1024:
            p.append(f"--rank: {lo.rank} is far beyond what LoRA needs; use 1-64")
        if not isinstance(lo.alpha, (int, float)) or lo.alpha <= 0:
            p.append(f"--alpha: must be a positive number (got {lo.alpha!r})")
        if not (0.0 <= lo.dropout < 1.0):
            p.append(f"--dropout: must be in [0, 1) (got {lo.dropout!r})")
        if lo.init not in INITS:
            p.append(f"lora.init: '{lo.init}' is not one of {', '.join(INITS)}")
        if not lo.targets:
            p.append("--targets: select at least one module to adapt")
        if da.format not in FORMATS:
            p.append(f"--format: '{da.format}' is not one of {', '.join(FORMATS)}")
        from core.chat import choice_problem

        if choice_problem(da.chat_template):
            p.append(choice_problem(da.chat_template))
        if not isinstance(da.max_length, int) or da.max_length < 8:
            p.append(f"--max-length: must be at least 8 tokens (got {da.max_length!r})")
        if not (0.0 <= da.val_split < 1.0):
            p.append(f"--val-split: must be a fraction in [0, 1) (got {da.val_split!r})")
        if (tr.steps is None) == (tr.epochs is None):
            p.append("--steps/--epochs: give exactly one of them")
        if tr.steps is not None and (not isinstance(tr.steps, int) or tr.steps < 1):
            p.append(f"--steps: must be a whole number of at least 1 (got {tr.steps!r})")
        if tr.epochs is not None and (not isinstance(tr.epochs, (int, float)) or tr.epochs <= 0):
            p.append(f"--epochs: must be positive (got {tr.epochs!r})")
        if not isinstance(tr.batch_size, int) or tr.batch_size < 1:
            p.append(f"--batch-size: must be at least 1 (got {tr.batch_size!r})")
        elif tr.batch_size > MAX_BATCH:  # a config file's 10**9 built index lists for minutes (the fuzz suite)
            p.append(f"--batch-size: {tr.batch_size} examples per step is beyond any machine's memory; "
                     f"use at most {MAX_BATCH} (raise --grad-accum for a larger effective batch)")
        if not isinstance(tr.grad_accum, int) or tr.grad_accum < 1:
            p.append(f"--grad-accum: must be at least 1 (got {tr.grad_accum!r})")
        if not isinstance(tr.lr, (int, float)) or not (0 < tr.lr < 1):
            p.append(f"--lr: must be in (0, 1) (got {tr.lr!r})")
        if tr.scheduler not in SCHEDULERS:
            p.append(f"--scheduler: '{tr.scheduler}' is not one of {', '.join(SCHEDULERS)}")
        for name, v in (("--warmup", tr.warmup), ("--eval-every", tr.eval_every),
                        ("--save-every", tr.save_every)):
            if not isinstance(v, int) or v < 0:
                p.append(f"{name}: must be a whole number of at least 0 (got {v!r})")
        if not isinstance(tr.log_every, int) or tr.log_every < 1:
            p.append(f"train.log_every: must be at least 1 (got {tr.log_every!r})")
        if tr.max_grad_norm < 0:
            p.append(f"train.max_grad_norm: must be at least 0 (got {tr.max_grad_norm!r})")
        return p

    def validate(self) -> "RunConfig":
        """Raise :class:`ConfigError` listing every problem, or return self."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


def replace(obj, **changes):
    """``dataclasses.replace`` re-exported so callers need not import dataclasses."""
    return dataclasses.replace(obj, **changes)
