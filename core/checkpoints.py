"""A training checkpoint on disk (``checkpoints/step-N/`` of a run folder, core.runs), and the optimizer
and random-number states it carries, taken and put back.

A checkpoint is four files, written into a staged folder and renamed into place
(core.atomic.staged_folder); ``state.json`` (``runs.CHECKPOINT_DONE``) is written last and marks the
folder complete:

* ``adapter.safetensors``: the adapter's matrices;
* ``optimizer.safetensors``: AdamW's per-parameter tensors (``<i>.<name>``, i the parameter's position);
* ``rng.safetensors``: torch's (and each CUDA device's) generator state and numpy's key array;
* ``state.json``: the step, the position in the data, the optimizer's groups and scalars, the
  schedule, the loss scaler, Python's and the rest of numpy's random state, and what the trainer
  checks on resume (the dataset's hash, the global batch, the adapter's parameter names).

core.train.Trainer decides when to write one and what must match to resume from one.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from core import atomic, runs
from core.errors import StudioError

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


def write(folder: Path, adapter: dict, opt_tensors: dict, rng: dict, state: dict) -> None:
    """Write a checkpoint atomically; ``state`` (JSON) last, as the mark of a complete folder."""
    from safetensors.torch import save_file

    with atomic.staged_folder(folder) as tmp:
        save_file(adapter, str(tmp / ADAPTER_FILE))
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng, str(tmp / RNG_FILE))
        atomic.write_json(tmp / runs.CHECKPOINT_DONE, state)  # last: marks the folder complete


def read(folder: Path) -> tuple[dict, dict, dict, dict]:
    """``(state, adapter, optimizer tensors, rng tensors)`` of a checkpoint; one line if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from core import safeio

    try:
        state = json.loads((folder / runs.CHECKPOINT_DONE).read_text(encoding="utf-8"))
        adapter = load_file(str(folder / ADAPTER_FILE))
        opt_tensors = load_file(str(folder / OPTIMIZER_FILE))
        rng = load_file(str(folder / RNG_FILE))
    except (OSError, ValueError, RecursionError, SafetensorError) as e:
        raise StudioError(f"checkpoint {folder}: unreadable ({safeio.first_line(e)})",
                          hint="delete it to resume from an older one") from None
    return state, adapter, opt_tensors, rng


# -- the optimizer ---------------------------------------------------------------------------------

def optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[dict, dict, list]:
    """``(tensors, scalars, groups)``: the optimizer's per-parameter tensors keyed ``<i>.<name>`` (on
    the CPU), its per-parameter scalars by ``str(i)``, and its groups' settings (no ``params``)."""
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, dict] = {}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                opt_tensors[f"{i}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                opt_scalars.setdefault(str(i), {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return opt_tensors, opt_scalars, groups


def restore_optimizer(optimizer: torch.optim.Optimizer, n_params: int, opt_tensors: dict, state: dict) -> None:
    """Load what :func:`optimizer_state` took (tensors, and ``state``'s ``optimizer_scalars`` and
    ``param_groups``) into ``optimizer``, which holds the same ``n_params`` parameters in order."""
    per_param: dict[int, dict] = {}
    for key, t in opt_tensors.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = t
    for i, extra in state.get("optimizer_scalars", {}).items():
        per_param.setdefault(int(i), {}).update(extra)
    groups = [dict(g, params=list(range(n_params))) for g in state["param_groups"]]
    check_groups(groups, optimizer.param_groups)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def check_groups(saved: list[dict], current: list[dict]) -> None:
    """A checkpoint's optimizer groups hold every setting this optimizer has, of the same kind (a
    number for ``lr``, a pair for ``betas``, ...): else the first step would fail on them, not the load."""
    if len(saved) != len(current):
        raise ValueError(f"{len(saved)} optimizer groups, this optimizer has {len(current)}")
    for g, ref in zip(saved, current):
        for key, value in ref.items():
            if key == "params":
                continue
            got = g.get(key, KeyError)
            if got is KeyError:
                raise KeyError(f"optimizer setting '{key}' is missing")
            number = (int, float)
            same = (isinstance(got, bool) == isinstance(value, bool)
                    and (not isinstance(value, number) or isinstance(got, number))
                    and (not isinstance(value, (tuple, list)) or (isinstance(got, (tuple, list))
                                                                 and len(got) == len(value))))
            if not same:
                raise TypeError(f"optimizer setting '{key}' is {type(got).__name__}, expected {type(value).__name__}")


# -- random states ---------------------------------------------------------------------------------

def rng_state() -> tuple[dict, dict]:
    """``(tensors, state)``: torch's, each initialised CUDA device's and numpy's key array as tensors
    (for rng.safetensors), and Python's and the rest of numpy's state as JSON (for state.json)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for j, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{j}"] = s
    np_state = np.random.get_state()
    rng["numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    return rng, {"python_random": [py_state[0], list(py_state[1]), py_state[2]],
                 "numpy_random": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def restore_rng(rng: dict, state: dict) -> None:
    """Put back what :func:`rng_state` took (CUDA's for the devices this machine has)."""
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[f"cuda.{j}"] for j in range(len(rng)) if f"cuda.{j}" in rng]
    if cuda_states and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    np_name, np_pos, np_gauss, np_cached = state["numpy_random"]
    np.random.set_state((np_name, rng["numpy"].numpy().astype(np.uint32), np_pos, np_gauss, np_cached))
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
