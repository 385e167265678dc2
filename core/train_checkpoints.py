"""What a training run keeps (a mixin of :class:`core.train.Trainer`, whose state it shares): its
checkpoints and, at the end, its adapter.

A checkpoint is written every ``save_every`` steps, at a stop, a pause and the end, never from an
adapter whose weights are no longer finite (a diverged run must not replace a good checkpoint). Read
back to resume or to leave a pause, it must match the run (the adapter's modules, the global batch,
the dataset's sha256) and it puts the adapter, AdamW, the schedule, the loss scaler, every RNG and
the data position back exactly. :meth:`_finish` writes the adapter with its studio.json (the
training summary, the thinned loss curves, the dataset and base model it was trained on) and the
run's final status. The files' format is :mod:`core.checkpoints`; here is what goes in them and when.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import StudioError
from core.train_events import RunResult
from core.train_setup import _Owned

CURVE_POINTS = 500  # the loss curve kept in studio.json is thinned to at most this many points


def _thin(points: list, limit: int = CURVE_POINTS) -> list:
    """At most ``limit`` of ``points``, evenly spaced, the last always kept (the run's final loss)."""
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit - 1)]
    return picked + [points[-1]]


class RunCheckpoints:
    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N (rank 0 only) and keep the newest few. Returns its folder."""
        if not self.is_main:
            return None
        if self._saved_step == self.step and self.run_folder.checkpoint_dir(self.step).is_dir():
            return self.run_folder.checkpoint_dir(self.step)
        from core import checkpoints

        self._status("checkpoint", f"saving checkpoint at step {self.step}")
        folder = self.run_folder.checkpoint_dir(self.step)
        adapter = {k: p.detach().to("cpu").contiguous() for k, p in self.params.items()}
        bad = next((k for k, t in adapter.items() if not torch.isfinite(t).all()), None)
        if bad is not None:  # never let a diverged adapter replace a good checkpoint
            raise StudioError(f"step {self.step}: the adapter's weights ({bad}) are no longer finite, so "
                              f"training stopped; {self._last_good()}",
                              hint=f"lower --lr (now {self.cfg.train.lr:g}) or add --warmup steps")
        opt_tensors, opt_scalars, groups = checkpoints.optimizer_state(self.optimizer, list(self.params.values()))
        rng, random_state = checkpoints.rng_state()
        state = {
            "step": self.step, "total_steps": self.total_steps, "consumed": self.consumed,
            "epoch": self.consumed // len(self.train_set), "index": self.consumed % len(self.train_set),
            "seed": self.cfg.train.seed, "world_size": self.world, "global_batch": self.global_batch,
            "param_names": self.param_names, "param_groups": groups, "optimizer_scalars": opt_scalars,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            **random_state,
            "best_eval_loss": self.best_eval, "last_loss": self.last_loss,
            "elapsed": getattr(self, "_elapsed_now", self.elapsed_before),
            "dataset_sha256": self.dataset_info.get("sha256"), "train_examples": len(self.train_set),
        }
        checkpoints.write(folder, adapter, opt_tensors, rng, state)
        self._saved_step = self.step
        self.run_folder.prune_checkpoints()
        self.run_folder.write_status("running", step=self.step, total_steps=self.total_steps,
                                     checkpoint=str(folder), final_loss=self.last_loss)
        return folder

    def _load_checkpoint(self, folder: Path) -> None:
        from core import checkpoints, safeio

        state, adapter, opt_tensors, rng = checkpoints.read(folder)
        try:
            self._apply_checkpoint(folder, state, adapter, opt_tensors, rng)
        except StudioError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            # state.json or a tensor file that parses but does not hold what this trainer wrote
            raise StudioError(f"checkpoint {folder}: damaged ({type(e).__name__}: {safeio.first_line(e)})",
                              hint="delete it to resume from an older one") from None

    def _apply_checkpoint(self, folder: Path, state, adapter, opt_tensors, rng) -> None:
        """Put a checkpoint's adapter, optimizer, schedule and random states in place."""
        from core import checkpoints

        if not isinstance(state, dict):
            raise TypeError("state.json does not hold an object")
        if state["param_names"] != self.param_names:
            raise StudioError(f"checkpoint {folder}: its adapter has different modules than this configuration",
                              hint="resume with the run's own config.json")
        if state.get("global_batch") != self.global_batch:
            raise StudioError(f"checkpoint {folder}: written with a global batch of {state.get('global_batch')} "
                              f"examples, this run has {self.global_batch} (batch size × processes × grad-accum)",
                              hint="resume with the same --batch-size, --grad-accum and number of processes")
        sha = self.dataset_info.get("sha256")
        if state.get("dataset_sha256") and sha and state["dataset_sha256"] != sha:
            raise StudioError(f"checkpoint {folder}: the dataset {self.dataset_info['path']} changed since it was "
                              "written", hint="resume with the same data, or start a new run")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(adapter[k].to(p.device, p.dtype))
        checkpoints.restore_optimizer(self.optimizer, len(self.params), opt_tensors, state)
        self.scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups)))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        checkpoints.restore_rng(rng, state)
        self.step = int(state["step"])
        self.consumed = int(state["consumed"])
        self.best_eval = state.get("best_eval_loss")
        self.last_loss = state.get("last_loss")
        self.elapsed_before = float(state.get("elapsed") or 0.0)
        self._elapsed_now = self.elapsed_before

    # -- the end -----------------------------------------------------------------------------------
    def _finish(self, status: str) -> RunResult:
        """Final checkpoint, the adapter with its studio.json, status.json; the result."""
        checkpoint = self._save_checkpoint()
        adapter = None
        duration = getattr(self, "_elapsed_now", 0.0)
        if self.is_main:
            from core import adapter as adapter_mod, bundled

            rows = self.run_folder.read_metrics()
            curve = [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None]
            evals = [[r["step"], r["eval_loss"]] for r in rows if r.get("eval_loss") is not None]
            summary = {
                "status": status, "steps": self.step, "total_steps": self.total_steps,
                "epochs": round(self.consumed / len(self.train_set), 6), "final_loss": self.last_loss,
                "best_eval_loss": self.best_eval, "duration_seconds": round(duration, 3),
                "tokens": int(sum(r.get("tokens", 0) for r in rows if "loss" in r)),
                "global_batch": self.global_batch, "world_size": self.world,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "run_folder": str(self.run_folder.path), "config": self.cfg.to_dict(),
            }
            lm = self.loaded.inner if isinstance(self.loaded, _Owned) else self.loaded
            self._status("checkpoint", "saving the adapter")
            adapter = adapter_mod.save_adapter(
                self.model, self.run_folder.adapter_dir, self._adapter, base_model=self.cfg.model.source,
                studio={"name": self.cfg.name, "training": summary, "loss_curve": _thin(curve),
                        "eval_curve": _thin(evals), "dataset": self.dataset_info,
                        "base_model": {"spec": self.cfg.model.source, "path": str(getattr(lm, "path", "")),
                                       **bundled.source_file(self.cfg.model.source, getattr(lm, "path", None))},
                        "targets_spec": self.cfg.lora.targets})
            self.run_folder.write_status(status, step=self.step, total_steps=self.total_steps,
                                         final_loss=self.last_loss, best_eval_loss=self.best_eval,
                                         duration=round(duration, 3), adapter=str(adapter),
                                         message="" if status == "finished" else f"stopped at step {self.step}")
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        msg = (f"finished {self.step} steps" if status == "finished"
               else f"stopped at step {self.step} of {self.total_steps}; continue with --resume")
        self._status(status, msg, 1.0 if status == "finished" else None)
        return RunResult(status=status, out=self.run_folder.path, step=self.step, total_steps=self.total_steps,
                         final_loss=self.last_loss, best_eval_loss=self.best_eval, adapter=adapter,
                         checkpoint=checkpoint, duration=duration, message=msg)
