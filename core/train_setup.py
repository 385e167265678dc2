"""A training run's set-up, from the environment to step 0 (a mixin of :class:`core.train.Trainer`,
whose state it shares), and its undoing.

Set-up runs once per run, before the first step, in this order: the process group under ``torchrun``,
the run folder (a new run refuses one that already holds a run), the base model (given, or loaded and
owned), the tokenised dataset and the record of where it came from, a fresh adapter with gradients for
its matrices only, AdamW with its schedule, and the position: step 0, or a checkpoint's. It sets what
the loop and the checkpoints read (``model``, ``params``, ``train_set``, ``global_batch``,
``total_steps``, ``optimizer``, ``scheduler``, ``scaler``, ``step``, ``consumed``). :meth:`_cleanup`
undoes what set-up did to a model the trainer was given, so the window gets its model back as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from pathlib import Path

import torch

from core import lora
from core.errors import Cancelled, StudioError
from core.train_events import RunResult
from core.train_optimizer import _Factor, make_adamw

ADAPTER_NAME = "default"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (sorted relative names and contents)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class _Owned:
    """A LoadedModel this trainer loaded itself (so it need not be restored at the end)."""

    def __init__(self, inner):
        self.inner = inner


class TrainSetup:
    # -- the process group -------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self._owns_group = False
        if world <= 1:
            return
        import torch.distributed as dist

        self.world = world
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        dev = (self.cfg.model.device or "auto").lower()
        use_cuda = torch.cuda.is_available() and dev in ("auto", "cuda") or dev.startswith("cuda:")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            self._owns_group = True
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self._device_spec = f"cuda:{self.local_rank}"
        elif dev == "auto":
            self._device_spec = "cpu"

    # -- set-up ------------------------------------------------------------------------------------
    def _prepare_folder(self, resume: bool) -> Path | None:
        rf = self.run_folder
        checkpoint = rf.latest_checkpoint() if resume else None
        if not resume and self.is_main:
            used = [p.name for p in (rf.metrics_path, rf.checkpoints_dir, rf.adapter_dir) if p.exists()]
            if used:
                raise StudioError(f"--out {rf.path}: this folder already holds a run ({', '.join(used)})",
                                  hint="continue it with --resume, or choose another --out folder")
        return checkpoint

    def _load_base(self):
        """The base model: the one the trainer was given, or loaded now (and owned: freed at the end)."""
        cfg = self.cfg
        if self.loaded is None:
            from core import models

            self._status("loading", f"loading {cfg.model.source}", 0.0)
            self.loaded = _Owned(models.load_model(
                cfg.model.source, device=self._device_spec or cfg.model.device, precision=cfg.model.precision,
                trust_remote_code=cfg.model.trust_remote_code, quantize=cfg.model.quantize,
                progress=lambda m, f: self._status("loading", m, f)))
        return self.loaded.inner if isinstance(self.loaded, _Owned) else self.loaded

    def _prepare_data(self, tokenizer, seed: int) -> bool:
        """Tokenise the dataset, record where it came from, and size the run; False if stopped meanwhile."""
        from core import chat, data

        cfg = self.cfg
        self._status("tokenizing", "reading and tokenising the dataset", 0.0)
        try:
            prepared = data.prepare(cfg.data, tokenizer, seed=seed, cancel=self._stop.is_set,
                                    progress=lambda d, t: self._status("tokenizing", f"tokenising {d}/{t}",
                                                                       d / t if t else 1.0))
        except Cancelled:
            return False
        self.prepared = prepared
        self.train_set, self.val_set = prepared.train, prepared.val
        n = len(self.train_set)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        data_path = Path(cfg.data.path) if cfg.data.path else (prepared.source.path if prepared.source else None)
        self.dataset_info = {
            "path": str(data_path) if data_path else "",
            "sha256": file_sha256(data_path) if data_path and data_path.exists() else None,
            "format": prepared.format, "fields": prepared.fields,
            "examples": prepared.stats.get("examples"), "train_examples": prepared.stats.get("train_examples"),
            "val_examples": prepared.stats.get("val_examples"), "truncated": prepared.truncated,
            **chat.rendering_record(tokenizer, cfg.data.chat_template),  # how prompts must be rendered
        }
        # trained tokens per example after the one-token shift (labels[1:]), from the (mapped) arrays
        from core.dataset_cache import trained_per_example

        self._trained = trained_per_example(self.train_set)
        self._lengths = self.train_set.lengths

        self.global_batch = cfg.train.batch_size * self.world * cfg.train.grad_accum
        if cfg.train.steps is not None:
            self.total_steps = int(cfg.train.steps)
        else:
            self.total_steps = max(1, math.ceil(float(cfg.train.epochs) * n / self.global_batch))
        return True

    def _inject(self, model, seed: int) -> None:
        """Put a fresh adapter on the model (named ``default``, or ``training`` if that is taken), with
        gradients for its matrices only, gradient checkpointing if asked, and DDP across processes."""
        from core import targets as targets_mod

        cfg = self.cfg
        names = targets_mod.resolve_targets(model, cfg.lora.targets)
        if ADAPTER_NAME in lora.adapter_names(model):
            self._adapter = "training"
            i = 2
            while self._adapter in lora.adapter_names(model):
                self._adapter = f"training-{i}"
                i += 1
        torch.manual_seed(seed)  # A's initialisation depends on the seed alone
        lora.inject_adapter(model, names, self._adapter, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                            dropout=cfg.lora.dropout, rslora=cfg.lora.rslora, init=cfg.lora.init)
        self._injected = True
        self.model = model
        self.target_names = names
        self.params = lora.lora_parameters(model, [self._adapter])
        self.param_names = list(self.params)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if {id(p) for p in trainable} != {id(p) for p in self.params.values()}:
            raise RuntimeError("parameters other than the adapter's require gradients")
        if cfg.model.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise StudioError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
            # non-reentrant checkpointing: works with frozen inputs, DDP and the fused LoRA function
            if hasattr(model, "activation_checkpointing_enable"):  # the newer name (not in transformers 5.17)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            self._gc_enabled = True
        model.train()

        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False, gradient_as_bucket_view=True)
        self.forward_model = self.ddp if self.ddp is not None else model

    def _make_optimizer(self) -> None:
        """AdamW over the adapter's matrices, the learning-rate schedule, and fp16's loss scaler."""
        tr = self.cfg.train
        self.optimizer = make_adamw(list(self.params.values()), lr=tr.lr, weight_decay=tr.weight_decay)
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in self.params.values()}, "the optimizer must hold the adapter's matrices and nothing else"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _Factor(self.total_steps, tr.warmup, tr.scheduler))
        use_cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_cuda and self.dtype == torch.float16 else None

    def _restore_position(self, checkpoint: Path | None, seed: int) -> None:
        """Step 0, or the checkpoint's step, optimizer and random states; then the run folder's files."""
        cfg = self.cfg
        self.step = 0
        self.consumed = 0
        self.elapsed_before = 0.0
        self.best_eval: float | None = None
        self.last_loss: float | None = None
        self._perm_epoch, self._perm = -1, None
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
            if self.world > 1:  # ranks other than 0 keep their own dropout streams
                torch.manual_seed(seed + self.rank + 1000003 * self.step)
            self._status("loading", f"resuming from {checkpoint.name}")
        elif self.world > 1:
            torch.manual_seed(seed + self.rank)

        if self.is_main:
            self.run_folder.write_config(cfg)
            if checkpoint is not None:
                self.run_folder.truncate_metrics(self.step)
            else:
                self.run_folder.reset_metrics()
            self.run_folder.write_status("running", step=self.step, total_steps=self.total_steps,
                                         name=cfg.name, message="", world_size=self.world)

    def _stopped_early(self) -> RunResult:
        self._status("stopped", "stopped before training began")
        if self.is_main and self.run_folder.path.exists():
            self.run_folder.write_status("stopped", step=0, message="stopped before training began")
        return RunResult(status="stopped", out=self.run_folder.path, step=0, total_steps=0,
                         duration=time.perf_counter() - self._t_start, message="stopped before training began")

    # -- the end of a run, whatever its end -------------------------------------------------------
    def _cleanup(self) -> None:
        """After every run, however it ended: a model the trainer was given goes back as it was (no
        adapter, no gradients, eval mode), the optimizer is dropped, and a process group this trainer
        made is destroyed."""
        model = self.model
        if self.loaded is not None and not isinstance(self.loaded, _Owned) and model is not None:
            # give the window its model back as it was
            with contextlib.suppress(Exception):
                if self._gc_enabled:
                    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                    off()
                    model.disable_input_require_grads()
                if self._injected and self._adapter in lora.adapter_names(model):
                    lora.remove_adapter(model, self._adapter)
                model.requires_grad_(False)
                model.eval()
        self.optimizer = None
        self.ddp = None
        if self._owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self.collect_cycles()
