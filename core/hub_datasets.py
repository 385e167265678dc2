"""Datasets on the Hugging Face Hub: ``--data org/name`` (with ``--data-split`` and ``--data-config``),
read through ``datasets.load_dataset`` into ``datasets``' own cache (``HF_DATASETS_CACHE``, by default
``HF_HOME/datasets``), so a second look, another tool, or a machine gone offline finds it there.

Only data files are read (parquet, JSON, CSV, ...: what ``datasets`` 4+ loads); a dataset that would
need its own loading script is refused by ``datasets`` itself. Every failure is one line naming the
``--data`` value and what to do (core.errors.StudioError).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

from core.errors import StudioError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")


def is_hub_dataset(spec: str | Path) -> bool:
    """``org/name`` that is not a path on this machine and does not end like a data file."""
    text = str(spec).strip()
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists() \
        and not text.lower().endswith(_FILE_SUFFIXES)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error(e: BaseException, spec: str, split: str | None, subset: str | None) -> StudioError:
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub import errors as hub_errors

    from core import hub

    what = f"--data {spec}"
    text = _first_line(e)
    if isinstance(e, hub_errors.GatedRepoError) or "gated" in text.lower():
        return StudioError(f"{what}: a gated dataset, and this machine's token has no access",
                           hint=f"accept its terms at {hub.endpoint()}/datasets/{spec}, then log in with "
                                "'hf auth login' or set HF_TOKEN")
    if isinstance(e, (DatasetNotFoundError, hub_errors.RepositoryNotFoundError)):
        offline = hub.is_offline()
        return StudioError(
            f"{what}: " + ("not in the local datasets cache, and the machine is offline (HF_HUB_OFFLINE is set)"
                           if offline else f"no dataset {spec} on {hub.endpoint()} (or it is private)"),
            hint="connect and unset HF_HUB_OFFLINE" if offline else
                 "check the spelling (org/name) and the file path; for a private dataset log in with "
                 "'hf auth login' or set HF_TOKEN")
    if isinstance(e, ValueError) and ("split" in text.lower()) and split:
        return StudioError(f"--data-split {split}: {spec} has no such split ({text})",
                           hint="leave --data-split out to use 'train'")
    if isinstance(e, ValueError) and ("config" in text.lower()):
        given = f"--data-config {subset}" if subset else "--data-config"
        return StudioError(f"{given}: {text}", hint=f"name one of the configurations of {spec}")
    if isinstance(e, (ConnectionError, OSError, hub_errors.OfflineModeIsEnabled)):
        return StudioError(f"{what}: cannot reach {hub.endpoint()} and the dataset is not cached ({text})",
                           hint="check the network connection")
    return StudioError(f"{what}: cannot read this dataset ({text})")


def load(spec: str, split: str | None = None, subset: str | None = None) -> tuple[Any, list[str]]:
    """The Hub dataset ``spec`` as a ``datasets.Dataset`` (memory-mapped from datasets' cache) and notes
    on how it was read. Without ``split``: ``train``, or the only split there is."""
    from core import hub
    from core.data_read import _quiet_datasets, train_split

    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        datasets = stack.enter_context(_quiet_datasets())  # imports huggingface_hub, which sets its level
        hub_log = logging.getLogger("huggingface_hub")  # "Repo card metadata block was not found", ...
        stack.callback(hub_log.setLevel, hub_log.level)
        hub_log.setLevel(logging.ERROR)
        try:
            ds = datasets.load_dataset(spec, name=subset or None, split=split or None, token=hub.token())
        except StudioError:
            raise
        except Exception as e:  # datasets raises many types (HTTP, file format, builder errors)
            raise _error(e, spec, split, subset) from None
        if isinstance(ds, datasets.DatasetDict):
            ds, split = train_split(ds, f"--data {spec}: the dataset", "choose one with --data-split", notes)
    notes.append(f"from the Hugging Face Hub ({spec}{', ' + subset if subset else ''}, split "
                 f"'{split}'), cached by datasets")
    return ds, notes
