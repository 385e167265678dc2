"""The Hugging Face Hub: what a repo holds before anything big is fetched, whether it will fit, and
downloading it (core.hub_download does the bytes) into the standard Hugging Face cache, where
transformers, ``hf`` and every other tool find it too.

Everything reads the environment on each call, so a test or a script can move it: ``HF_ENDPOINT``
(the Hub's address), ``HF_TOKEN`` or the machine's ``hf auth login`` (gated and private repos),
``HF_HUB_OFFLINE`` (no network: what is cached works, a download says the machine is offline) and
the cache folder (core.models.hf_cache_dir).

Only safetensors weights are fetched, and only the ones the model uses (the shards its index names,
else ``model.safetensors``, else every top-level ``*.safetensors``), with the config, tokenizer and
generation files beside them; a repo whose weights are only pickles (``*.bin``, ``*.pt``) is refused
before any byte of them is fetched, as local ones are (core.models).

:func:`remote_model` asks the Hub what a repo holds (one API call); :func:`fetch_config` fetches
``config.json`` alone; :func:`fit_report` says what training it needs against the memory the device
has and what the download needs against the free disk; :func:`download` fetches the rest with
progress, cancel and resume; :func:`local_snapshot` finds a complete download in the cache;
:func:`ensure_model` is what ``--model ORG/NAME`` does on the command line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.errors import StudioError

TOKENIZER_AND_CONFIG = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                        "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                        "chat_template.json", "preprocessor_config.json")
"""The small files a checkpoint needs beside its weights (those of them the repo has)."""
INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_TRUE = ("1", "on", "yes", "true")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
"""What core.models.resolve takes for a repo id (the same pattern)."""


# -- the environment -------------------------------------------------------------------------------

def endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` as set now, else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def token() -> str | None:
    """``HF_TOKEN``, else the token of the machine's Hugging Face login, else None."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # an unreadable token file is the same as no login here
        return None


def is_repo_id(spec: str) -> bool:
    """``org/name`` that is not an existing path: what the Hub would be asked for (no torch import)."""
    spec = str(spec or "").strip()
    return bool(REPO_ID.match(spec)) and not Path(spec).expanduser().exists() \
        and not spec.lower().endswith(".gguf")


def repo_folder(repo_id: str, repo_type: str = "model") -> Path:
    """The repo's folder in the Hugging Face cache (``models--org--name``), existing or not."""
    from core.models import hf_cache_dir

    return hf_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def refuse_offline(what: str) -> None:
    if is_offline():
        raise StudioError(f"{what}: the machine is offline (HF_HUB_OFFLINE is set), and this is not in the "
                          "local Hugging Face cache",
                          hint="connect and unset HF_HUB_OFFLINE to download it, or use a model that is cached "
                               "('lora-studio models' lists them)")


def hub_error(e: BaseException, what: str, repo_id: str) -> StudioError:
    """One line for what went wrong talking to the Hub, with what to do."""
    from huggingface_hub import errors

    url = f"{endpoint()}/{repo_id}"
    if isinstance(e, errors.GatedRepoError):
        has = "the token in use has no access" if token() else "no Hugging Face token was found"
        return StudioError(f"{what}: {repo_id} is a gated model and {has}",
                           hint=f"accept its terms at {url} with your account, then log in with 'hf auth login' "
                                "or set HF_TOKEN to a token of that account")
    if isinstance(e, errors.RevisionNotFoundError):
        return StudioError(f"{what}: {repo_id} has no revision by that name",
                           hint=f"see the branches and commits at {url}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return StudioError(f"{what}: no model {repo_id} on {endpoint()} (or it is private)",
                           hint="check the spelling (org/name); for a private model log in with 'hf auth login' "
                                "or set HF_TOKEN")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return StudioError(f"{what}: the machine is offline (HF_HUB_OFFLINE is set)",
                           hint="connect and unset HF_HUB_OFFLINE to download")
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, errors.HfHubHTTPError):
        return StudioError(f"{what}: the Hub answered with an error ({text})", hint="try again later")
    return StudioError(f"{what}: cannot reach {endpoint()} ({text})",
                       hint="check the network connection (or set HF_HUB_OFFLINE=1 to use only cached models)")


def _network_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, httpx2.HTTPError, ConnectionError, TimeoutError)


# -- what a repo holds -----------------------------------------------------------------------------

@dataclass
class RemoteModel:
    """What the Hub says a model repo holds, and which of its files a download takes."""

    repo_id: str
    revision: str
    """What was asked for (``main`` unless ``--revision``)."""
    commit: str
    """The commit that revision is now: every file is fetched from it, so a push mid-download cannot mix."""
    gated: bool
    sizes: dict[str, int]
    """Every file of the repo and its size in bytes."""
    files: list[str] = field(default_factory=list)
    """What :func:`download` fetches: the small files first, the weights last."""

    @property
    def weights(self) -> list[str]:
        return [f for f in self.files if f.endswith(".safetensors")]

    @property
    def download_bytes(self) -> int:
        return sum(self.sizes.get(f, 0) for f in self.files)

    @property
    def weight_bytes(self) -> int:
        return sum(self.sizes.get(f, 0) for f in self.weights)


def _pick_weights(repo_id: str, sizes: dict[str, int], read_index: Callable[[], dict]) -> list[str]:
    top = [n for n in sizes if "/" not in n]
    if INDEX in sizes:
        try:
            shards = sorted(set(read_index()["weight_map"].values()))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise StudioError(f"{repo_id}: its {INDEX} is not a valid safetensors index",
                              hint="tell the model's authors; choose another revision or model") from None
        missing = [s for s in shards if s not in sizes]
        if missing:
            raise StudioError(f"{repo_id}: {INDEX} names {missing[0]}, which the repo does not have")
        return [INDEX, *shards]
    if "model.safetensors" in sizes:
        return ["model.safetensors"]
    found = sorted(n for n in top if n.endswith(".safetensors"))
    if found:
        return found
    pickles = sorted(n for n in top if any(fnmatch.fnmatch(n, p) for p in PICKLE_PATTERNS))
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise StudioError(
            f"{repo_id}: its weights are only {shown} (PyTorch pickle files); LoRA Studio reads weights only "
            "from safetensors or GGUF, because loading a pickle can run any code hidden in it",
            hint="choose the model's safetensors version (many repos have one under another name)")
    ggufs = sorted(n for n in top if n.lower().endswith(".gguf"))
    if ggufs:
        raise StudioError(f"{repo_id}: holds GGUF files ({ggufs[0]}, ...) but no safetensors checkpoint",
                          hint=f"download one file with 'hf download {repo_id} {ggufs[0]}' and use "
                               "--model PATH/TO/FILE.gguf")
    raise StudioError(f"{repo_id}: has no model weights (no *.safetensors file)",
                      hint="is this a model repo? check the id")


def remote_model(repo_id: str, revision: str | None = None) -> RemoteModel:
    """Ask the Hub what ``repo_id`` holds at ``revision`` (one API call, plus the small shard index of a
    sharded model) and choose the files a download takes. Refuses a pickle-only repo here."""
    from huggingface_hub import HfApi, hf_hub_download

    what = f"--model {repo_id}"
    refuse_offline(what)
    rev = revision or "main"
    try:
        info = HfApi(endpoint=endpoint(), token=token()).model_info(repo_id, revision=rev, files_metadata=True)
    except _network_errors() as e:
        raise hub_error(e, what, repo_id) from None
    sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    commit = info.sha or rev

    def read_index() -> dict:
        try:
            path = hf_hub_download(repo_id, INDEX, revision=commit, cache_dir=_cache(), endpoint=endpoint(),
                                   token=token())
        except _network_errors() as e:
            raise hub_error(e, what, repo_id) from None
        return json.loads(Path(path).read_text(encoding="utf-8"))

    weights = _pick_weights(repo_id, sizes, read_index)
    small = [n for n in TOKENIZER_AND_CONFIG if n in sizes]
    if "config.json" not in sizes:
        raise StudioError(f"{repo_id}: has no config.json, so it is not a transformers checkpoint",
                          hint="choose a model repo with config.json and safetensors weights")
    return RemoteModel(repo_id, rev, commit, bool(info.gated), sizes,
                       small + [w for w in weights if w not in small])


def _cache() -> str:
    from core.models import hf_cache_dir

    return str(hf_cache_dir())


def fetch_config(remote: RemoteModel) -> Path:
    """Fetch ``config.json`` alone into the cache; returns the snapshot folder that holds it (not yet a
    loadable model). A gated repo the token cannot open fails here, before anything big."""
    from huggingface_hub import hf_hub_download

    what = f"--model {remote.repo_id}"
    try:
        path = hf_hub_download(remote.repo_id, "config.json", revision=remote.commit, cache_dir=_cache(),
                               endpoint=endpoint(), token=token())
    except _network_errors() as e:
        raise hub_error(e, what, remote.repo_id) from None
    return Path(path).parent


# -- what is cached --------------------------------------------------------------------------------

def _complete(folder: Path) -> bool:
    """A snapshot holds config.json and every weight file it needs, each whole (files appear in a
    snapshot only once complete, and download() fetches weights last)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def local_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of ``repo_id`` (at ``revision``: a branch, tag or commit; else ``main``, else
    the newest) if it is complete, else None. Reads the cache only."""
    repo = repo_folder(repo_id)
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    rev = revision or "main"
    ref = repo / "refs" / rev
    candidates = []
    if ref.is_file():
        candidates.append(snaps / ref.read_text(encoding="utf-8").strip())
    if (snaps / rev).is_dir():
        candidates.append(snaps / rev)
    if revision is None:
        candidates += sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime,
                             reverse=True)
    return next((c for c in candidates if c.is_dir() and _complete(c)), None)


# -- will it fit -----------------------------------------------------------------------------------

def free_disk(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def bytes_to_fetch(remote: RemoteModel) -> int:
    """What is left to download: files whose blob is not cached, less what their partial files hold."""
    from core.hub_download import cached_bytes

    return max(0, remote.download_bytes - cached_bytes(remote))


def device_memory(device: str = "auto") -> tuple[str, int | None]:
    """(what, bytes) of the memory a training step on ``device`` can use: the card's total memory on
    CUDA, the machine's RAM otherwise; None where it cannot be told."""
    from core.models import pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(dev)} memory", int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return "RAM", int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return "RAM", None


def fit_report(remote: RemoteModel, config_folder: Path, estimate: dict[str, Any], device: str = "auto") -> dict:
    """Whether ``remote`` can be trained here, from its config alone (fetched by :func:`fetch_config`).

    ``estimate`` holds core.models.estimate_memory's settings (batch_size, seq_len, rank, targets,
    precision, gradient_checkpointing, quantize). Returns ``summary`` (architecture, parameters,
    layers, context length), ``memory`` (the estimate's total with the settings), ``memory_nf4`` (the
    same with a 4-bit base, where bitsandbytes is installed, else None), ``capacity`` and
    ``capacity_name`` (the device's memory), ``download`` (bytes left to fetch), ``free_disk``,
    ``fits_memory``, ``fits_disk`` and ``problems`` (one line each, empty when it fits).
    """
    from core import models, quant
    from core.targets import count_parameters

    ref = models.ModelRef(remote.repo_id, "hub", config_folder, remote.repo_id)
    config = models._config_from_folder(ref, config_folder, False)
    meta = models._build_on_meta(ref, config, False)
    summary = {"architecture": (getattr(config, "architectures", None) or [type(meta).__name__])[0],
               "model_type": config.model_type, "parameters": count_parameters(meta),
               "layers": models._cfg(config, "num_hidden_layers", "n_layer", "num_layers"),
               "context_length": models._context_length(config), "weights_bytes": remote.weight_bytes}
    del meta
    kwargs = dict(estimate)
    if kwargs.get("precision", "auto") == "auto":
        kwargs["precision"] = models.pick_dtype(models.pick_device(device), "auto")
    memory = int(models.estimate_memory(config, **kwargs)["total"])
    nf4 = None
    if quant.available() and kwargs.get("quantize", "none") != "nf4":
        nf4 = int(models.estimate_memory(config, **dict(kwargs, quantize="nf4"))["total"])
    name, capacity = device_memory(device)
    need, free = bytes_to_fetch(remote), free_disk(Path(_cache()))
    report = {"summary": summary, "memory": memory, "memory_nf4": nf4, "capacity": capacity,
              "capacity_name": name, "download": need, "free_disk": free,
              "fits_memory": capacity is None or memory <= capacity, "fits_disk": need <= free, "problems": []}
    gib = 2**30
    if not report["fits_memory"]:
        also = (f"; with a 4-bit base (nf4) it needs {nf4 / gib:.1f} GiB" if nf4 else "")
        report["problems"].append(f"{remote.repo_id} does not fit: a training step needs about {memory / gib:.1f} "
                                  f"GiB, this machine's {name} is {capacity / gib:.1f} GiB{also}")
    if not report["fits_disk"]:
        report["problems"].append(f"{remote.repo_id} needs {need / gib:.1f} GiB of disk, {free / gib:.1f} GiB "
                                  f"is free in {_cache()}")
    return report


# -- downloading -----------------------------------------------------------------------------------

def download(repo_id: str, revision: str | None = None, *, progress=None, should_stop=None) -> Path:
    """Fetch ``repo_id`` (at ``revision``) into the Hugging Face cache and return its snapshot folder.

    ``progress(DownloadProgress)`` is called as bytes arrive (core.hub_download); ``should_stop()`` is
    asked as they do, and when it says True the download raises core.errors.Cancelled within about a
    second, keeping the partial file, which the next call resumes with an HTTP Range request. Refuses,
    in one line, offline, a gated model the token cannot open, a pickle-only repo, too little disk.
    """
    from core import hub_download

    remote = remote_model(repo_id, revision)
    need, free = bytes_to_fetch(remote), free_disk(Path(_cache()))
    if need > free:
        raise StudioError(f"--model {repo_id}: the download needs {need / 2**30:.2f} GiB and only "
                          f"{free / 2**30:.2f} GiB is free in {_cache()}",
                          hint="free some disk, or point HF_HOME at a larger disk")
    return hub_download.fetch(remote, progress=progress, should_stop=should_stop)


def ensure_model(spec: str, *, revision: str | None = None, progress=None) -> str:
    """What ``--model`` does on the command line: a repo id that is not completely in the cache is
    downloaded first (offline: one line saying so). Anything else is returned as it is."""
    spec = str(spec or "").strip()
    if not is_repo_id(spec) or local_snapshot(spec, revision) is not None:
        return spec
    refuse_offline(f"--model {spec}")
    download(spec, revision, progress=progress)
    return spec


def not_cached_error(spec: str) -> StudioError:
    """What resolving a repo id that is not (completely) in the cache says."""
    from core.models import hf_cache_dir

    from core.models import PICKLE_SUFFIXES, _pickle_error

    snaps = repo_folder(spec) / "snapshots"
    for snap in (sorted(snaps.iterdir()) if snaps.is_dir() else []):
        pickles = [p.name for p in snap.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(snap.glob("*.safetensors")):
            return _pickle_error(spec, snap, pickles)  # cached by another tool, pickles only
    offline = " (the machine is offline: HF_HUB_OFFLINE is set)" if is_offline() else ""
    return StudioError(f"--model {spec}: no such folder or file, and not (completely) in the local Hugging Face "
                       f"cache ({hf_cache_dir()}){offline}",
                       hint=f"download it with 'lora-studio models download {spec}', or pick it on the Model page")


def curated_models() -> list[dict]:
    """The short list of good small chat models the Model page offers (``resources/hub_models.json``):
    one entry per model, ``id``, ``parameters`` (as text), ``gated`` and ``size_class``."""
    from core.home import RESOURCES

    path = RESOURCES / "hub_models.json"
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))["classes"]
        return [dict(m, size_class=c["name"]) for c in classes for m in c["models"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StudioError(f"{path}: the list of models to download cannot be read ({e})",
                          hint="reinstall LoRA Studio") from None
