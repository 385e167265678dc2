"""``lora-studio train``: train one LoRA adapter headless, with a progress bar.

Every option of ``../shared/contract.md`` is here under its exact name. Options default to None so
that ``--config FILE`` (a run's ``config.json``) can be overlaid: the file gives the base, the flags
given beside it win. ``--resume --out RUN_DIR`` reads ``RUN_DIR/config.json`` the same way and
continues from the newest complete checkpoint. A finished run's adapter goes into the library, as the
window's does, unless ``--no-library`` is given. Ctrl-C asks the trainer to stop after the current step,
which writes a checkpoint; the command then exits 130 (a second Ctrl-C aborts at once).
Under ``torchrun --nproc-per-node N -m studio train ...`` the same command trains data-parallel.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from core.errors import StudioError
from studio.commands import add_model_option, fetch_model

# flag dest -> (section, field) of RunConfig
_MAP = {
    "model": ("model", "source"), "device": ("model", "device"), "precision": ("model", "precision"),
    "quantize": ("model", "quantize"),
    "gradient_checkpointing": ("model", "gradient_checkpointing"),
    "trust_remote_code": ("model", "trust_remote_code"),
    "targets": ("lora", "targets"), "rank": ("lora", "rank"), "alpha": ("lora", "alpha"),
    "dropout": ("lora", "dropout"), "rslora": ("lora", "rslora"),
    "data": ("data", "path"), "data_split": ("data", "split"), "data_config": ("data", "subset"),
    "format": ("data", "format"), "max_length": ("data", "max_length"),
    "packing": ("data", "packing"), "train_on_prompt": ("data", "train_on_prompt"),
    "val_split": ("data", "val_split"), "chat_template": ("data", "chat_template"),
    "steps": ("train", "steps"), "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"), "lr": ("train", "lr"), "scheduler": ("train", "scheduler"),
    "warmup": ("train", "warmup"), "weight_decay": ("train", "weight_decay"),
    "max_grad_norm": ("train", "max_grad_norm"), "eval_every": ("train", "eval_every"),
    "save_every": ("train", "save_every"), "log_every": ("train", "log_every"), "seed": ("train", "seed"),
    "out": (None, "out"), "name": (None, "name"), "init": ("lora", "init"), "fields": ("data", "fields"),
}


def register(sub) -> None:
    from core.config import FORMATS, PRECISIONS, SCHEDULERS
    from studio.commands import add_quantize_option

    t = sub.add_parser(
        "train", help="train one LoRA adapter headless, with a progress bar",
        description="Train one LoRA adapter on a dataset and write a run folder: config.json (repeat "
                    "the run with --config), metrics.jsonl (one line per step), checkpoints/step-N/ "
                    "(continue with --resume) and adapter/ (the final adapter, which PEFT loads). "
                    "Ctrl-C saves a checkpoint and exits 130. Under 'torchrun --nproc-per-node N -m "
                    "studio train ...' it trains data-parallel.",
        epilog="Defaults are those of a new run (or of --config FILE when given). Example: lora-studio "
               "train --model default --data chats.jsonl --out runs/first --steps 200 --rank 16")
    B = argparse.BooleanOptionalAction
    g = t.add_argument_group("what to train")
    add_model_option(g, default=None, prefix="", shown="default")
    g.add_argument("--data", metavar="FILE", help=".jsonl, .json, .csv, .parquet, .txt, a datasets save_to_disk "
                                                  "folder, or a Hub dataset id org/name (default: the bundled "
                                                  "sample dataset)")
    g.add_argument("--data-split", metavar="S", help="with a Hub dataset (--data org/name): the split to train "
                                                     "on (default: train, or its only split)")
    g.add_argument("--data-config", metavar="C", help="with a Hub dataset: its configuration, where it has several")
    g.add_argument("--out", metavar="RUN_DIR", help="the run folder to write (required)")
    g.add_argument("--name", help="a name for the run and its adapter (default: the run folder's name)")
    g.add_argument("--config", metavar="FILE", help="a run's config.json to start from; flags given beside it win")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint")
    g = t.add_argument_group("adapter")
    g.add_argument("--targets", help="a preset (attention-qv, attention, mlp, all-linear), comma-separated "
                                     "module-name suffixes, or a regular expression (default: all-linear)")
    g.add_argument("--rank", type=int, help="LoRA rank r (default: 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha/r (default: 16)")
    g.add_argument("--dropout", type=float, help="dropout on the adapter's input (default: 0)")
    g.add_argument("--rslora", action=B, default=None, help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--init", choices=("kaiming", "gaussian"), help="how A starts (default: kaiming; B starts at 0)")
    g = t.add_argument_group("data")
    g.add_argument("--format", choices=FORMATS, help="dataset format (default: auto, detected)")
    g.add_argument("--fields", metavar="FIELD=COLUMN,...",
                   help="map the format's fields to the file's columns, e.g. instruction=question,output=answer")
    g.add_argument("--max-length", type=int, help="tokens per example; longer ones are cut (default: 512)")
    g.add_argument("--packing", action=B, default=None, help="pack short examples into full-length sequences")
    g.add_argument("--train-on-prompt", action=B, default=None,
                   help="also compute the loss on prompt tokens (default: answers only)")
    g.add_argument("--val-split", type=float, help="fraction held out for validation (default: 0)")
    g.add_argument("--chat-template", metavar="auto|plain|chatml|FILE.jinja",
                   help="how conversations are rendered: the model's own template (auto; plain text when it has "
                        "none), plain ### Instruction/### Response, ChatML, or a template file (default: auto)")
    g = t.add_argument_group("training")
    g.add_argument("--steps", type=int, help="optimizer steps (default: 100; or give --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the training split, instead of --steps")
    g.add_argument("--batch-size", type=int, help="examples per forward pass, per process (default: 4)")
    g.add_argument("--grad-accum", type=int, help="forward passes per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate of AdamW (default: 2e-4)")
    g.add_argument("--scheduler", choices=SCHEDULERS, help="learning-rate schedule after warmup (default: cosine)")
    g.add_argument("--warmup", type=int, help="steps of linear warmup (default: 0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this; 0: off (default: 1)")
    g.add_argument("--eval-every", type=int, help="evaluate on the validation split every N steps "
                                                  "(default: 0, only at the end)")
    g.add_argument("--save-every", type=int, help="write a checkpoint every N steps (default: 50; 0: only at "
                                                  "stop and end)")
    g.add_argument("--log-every", type=int, help="read the loss back every N steps (a sync on GPUs; default: 1)")
    g.add_argument("--seed", type=int, help="seed of the initialisation, split, order and dropout (default: 42)")
    g = t.add_argument_group("hardware")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="base weights: auto (bf16/fp16 on CUDA, fp32 elsewhere), fp32, bf16, fp16")
    add_quantize_option(g)
    g.add_argument("--gradient-checkpointing", action=B, default=None,
                   help="recompute activations in the backward pass: less memory, about a third slower")
    g.add_argument("--trust-remote-code", action=B, default=None,
                   help="allow this model's own Python code to run (off unless asked)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar; one line per log step instead")
    t.add_argument("--no-library", action="store_true",
                   help="leave the finished adapter out of the library (by default it goes in, as from the window)")
    t.set_defaults(func=cmd_train)


def build_config(args: argparse.Namespace):
    """The RunConfig these arguments describe: ``--config`` (or, with ``--resume``, the run's own
    config.json), then every flag that was given. ``trust_remote_code`` comes from the flag alone: a
    file that turns it on is overruled (and says so), so a copied config.json never runs a model's code."""
    from core.config import RunConfig

    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.resume:
        if not args.out:
            raise StudioError("--resume: give the run folder with --out RUN_DIR")
        path = Path(args.out) / "config.json"
        if not path.is_file():
            raise StudioError(f"--resume: {args.out} holds no run (no config.json)",
                              hint="start it without --resume")
        cfg = RunConfig.load(path)
    else:
        cfg = RunConfig()
    if cfg.model.trust_remote_code and args.trust_remote_code is None:
        # a file never turns on a model's own code: that is asked for on the command line, each time
        cfg.model.trust_remote_code = False
        print(f"{args.config or Path(args.out) / 'config.json'} turns on trust_remote_code; it stays off "
              "unless --trust-remote-code is given", file=sys.stderr)
    named_after_folder = bool(cfg.out) and cfg.name == Path(cfg.out).name
    for dest, (section, name) in _MAP.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "fields":
            from core.data import parse_fields

            value = parse_fields(value)
        elif dest == "targets" and "," in value:
            from core.targets import describe_spec

            kind, names = describe_spec(value)
            value = names if kind == "names" else value  # a list of names, as the Layers page makes
        target = cfg if section is None else getattr(cfg, section)
        setattr(target, name, value)
    if args.steps is not None and args.epochs is None:
        cfg.train.epochs = None
    elif args.epochs is not None and args.steps is None:
        cfg.train.steps = None
    if args.config and args.out and args.name is None and named_after_folder:
        cfg.name = ""  # a repeated run is named after its own folder
    return cfg


def command_line(cfg, program: str = "lora-studio") -> list[str]:
    """The ``train`` command that builds ``cfg`` again (:func:`build_config` of its arguments equals
    it): the model, the data, the run folder and the length always, every other option only where
    it differs from a new run's default. The window's "Copy as command" shows it."""
    from core.config import RunConfig

    default = RunConfig()
    argv = [program, "train"]
    first = ("model", "data", "out", "name", "steps", "epochs")  # what a reader looks for first
    for dest in sorted(_MAP, key=lambda d: first.index(d) if d in first else len(first)):
        section, name = _MAP[dest]
        value = getattr(cfg if section is None else getattr(cfg, section), name)
        base = getattr(default if section is None else getattr(default, section), name)
        flag = "--" + dest.replace("_", "-")
        if dest in ("steps", "epochs"):
            if value is not None:
                argv += [flag, repr(value)]
        elif value is None or (value == base and dest not in ("model", "out")):
            continue
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif dest == "fields":
            argv += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(value) + ("," if len(value) == 1 else "")]  # "," keeps it a list
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


class _Terminal:
    """What a run shows on stderr: a progress bar (or, with --no-progress, a line per logged step),
    evaluations, one line per stage; only the first process of a multi-process run shows anything."""

    def __init__(self, no_progress: bool):
        self.show = int(os.environ.get("RANK", "0") or 0) == 0
        self.no_progress = no_progress
        self.bar = None
        self.shown_kinds: set[str] = set()

    def write(self, line: str) -> None:
        if not self.show:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def on_event(self, ev) -> None:
        from core.train import EvalEvent, StatusEvent, StepEvent

        if isinstance(ev, StepEvent):
            self._step(ev)
        elif isinstance(ev, EvalEvent):
            self.write(f"step {ev.step}: eval loss {ev.eval_loss:.4f}")
        elif isinstance(ev, StatusEvent):
            if ev.kind in ("tokenizing", "evaluating", "training"):
                if ev.kind in self.shown_kinds:
                    return  # one line per stage, not one per chunk or per evaluation
                self.shown_kinds.add(ev.kind)
            if ev.kind in ("checkpoint", "finished", "stopped", "failed"):
                return  # the checkpoints are in the folder; the end is reported by _report
            if ev.message:
                self.write(ev.message)

    def _step(self, ev) -> None:
        if self.no_progress or not self.show:
            if ev.loss is not None and self.show:
                self.write(f"step {ev.step}/{ev.total_steps} loss {ev.loss:.4f} lr {ev.lr:.3g} "
                           f"{ev.tokens_per_second:,.0f} tok/s eta {ev.eta:.0f}s")
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=ev.total_steps, initial=ev.step - 1, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc="train")
        self.bar.update(ev.step - self.bar.n)
        if ev.loss is not None:
            self.bar.set_postfix_str(f"loss {ev.loss:.4f}, lr {ev.lr:.2e}, {ev.tokens_per_second:,.0f} tok/s, "
                                     f"ETA {_duration(ev.eta)}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _report(result, args: argparse.Namespace, cfg) -> None:
    """The run's last line; a finished run's adapter goes to the library unless --no-library."""
    loss = f"; final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    ev = f"; best eval loss {result.best_eval_loss:.4f}" if result.best_eval_loss is not None else ""
    if result.status == "finished":
        print(f"finished {result.step} steps in {_duration(result.duration)}{loss}{ev}; adapter: {result.adapter}",
              file=sys.stderr)
        if not args.no_library:
            _adopt(result.out)
    else:
        where = f"; checkpoint: {result.checkpoint}" if result.checkpoint else ""
        print(f"stopped at step {result.step} of {result.total_steps}{loss}{where}; "
              f"continue with: lora-studio train --resume --out {cfg.out}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if not cfg.out:
        raise StudioError("--out: choose a run folder (RUN_DIR)")
    fetch_model(cfg.model.source)
    cfg.validate()
    from core.train import Trainer

    terminal = _Terminal(args.no_progress)
    trainer = Trainer(cfg, callback=terminal.on_event)
    interrupted = 0

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted += 1
        if interrupted > 1:
            raise KeyboardInterrupt
        terminal.write("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
        trainer.request_stop()

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = trainer.run(resume=args.resume)
    finally:
        signal.signal(signal.SIGINT, old)
        terminal.close()
    if terminal.show:
        _report(result, args, cfg)
    return 130 if result.status == "stopped" and interrupted else 0


def _adopt(run_dir) -> None:
    """Put a finished run's adapter into the library, as the Train page does, and say where it went.
    A failure is one line: the run and its adapter stay where they are."""
    from core.library import Library

    try:
        entry = Library().adopt_run(run_dir)
    except (StudioError, OSError) as e:
        print(f"the adapter was not added to the library ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              f"add it later with: lora-studio library import {run_dir}", file=sys.stderr)
        return
    print(f"added to the library as '{entry.name}' ({entry.path})", file=sys.stderr)


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"
