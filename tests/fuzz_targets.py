"""Every reader the studio points at a user's file, as a fuzz target: real seed files, and how one
mutated file is driven through the real entry point (the command line, or the core call).

:class:`Seeds` builds the seed files once (a tiny checkpoint, one dataset per format, an adapter
folder and its zip, a run config, a GGUF, a library with one entry and a checkpointed run).
Each :class:`Target` makes one case in a fresh folder from a ``random.Random`` and returns what to
run; :func:`fuzzing.check` judges it. tests/test_fuzz*.py runs a few cases each with fixed seeds;
benchmarks/fuzz.py runs many.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fuzzing import mutate, mutate_any

TRAIN_FLAGS = ["--device", "cpu", "--steps", "1", "--max-length", "64", "--rank", "2", "--batch-size", "2",
               "--no-progress", "--save-every", "0", "--targets", "q_proj,v_proj"]

ROWS = [
    {"messages": [{"role": "user", "content": "Two lattes, please."},
                  {"role": "assistant", "content": "{\"drink\": \"latte\", \"quantity\": 2}"}]},
    {"instruction": "Translate to French", "input": "cheese", "output": "fromage"},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    {"text": "Write a haiku about autumn leaves falling on a quiet river at dusk."},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
]


@dataclass
class Case:
    """One case: ``call`` runs it (``cli``: a ``studio.cli.run`` exit code); only ``writable`` may change."""
    call: Callable[[], object]
    writable: list[Path]
    cli: bool
    what: str


class Seeds:
    """The seed files, built once under ``folder``."""

    def __init__(self, folder: Path):
        from conftest import tiny_checkpoint

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint = tiny_checkpoint(self.folder / "tiny")
        self.data = self._datasets(self.folder / "data")
        self.adapter = self._adapter(self.folder / "adapter")
        self.zip = self._zip(self.adapter, self.folder / "adapter.zip")
        self.run_config = self._run_config(self.folder / "config.json")
        self.gguf = self._gguf(self.folder / "tiny.gguf")
        self.run = self._run(self.folder / "run")

    def _datasets(self, d: Path) -> dict[str, Path]:
        import datasets

        d.mkdir(parents=True, exist_ok=True)
        chat = [ROWS[0]] * 4
        instr = [ROWS[1]] * 4
        out = {"jsonl": d / "chat.jsonl", "json": d / "instr.json", "csv": d / "instr.csv", "tsv": d / "pc.tsv",
               "txt": d / "notes.txt", "parquet": d / "instr.parquet", "disk": d / "saved"}
        out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in chat + [ROWS[4]]), encoding="utf-8")
        out["json"].write_text(json.dumps({"version": 2, "data": instr}), encoding="utf-8")
        out["csv"].write_text("instruction,input,output\n" + "Translate to French,cheese,fromage\n" * 3
                              + "\"Say \"\"hi\"\"\",,\"hello,\nworld\"\n", encoding="utf-8")
        out["tsv"].write_text("prompt\tcompletion\n" + "The quick brown fox\t jumps over the lazy dog.\n" * 3,
                              encoding="utf-8")
        out["txt"].write_text("First paragraph, line one.\nline two.\n\nSecond paragraph.\n", encoding="utf-8")
        ds = datasets.Dataset.from_list(instr)
        ds.to_parquet(str(out["parquet"]))
        datasets.Dataset.from_list(chat).save_to_disk(str(out["disk"]))
        return out

    def _adapter(self, folder: Path) -> Path:
        import torch
        from conftest import TOKENIZER_VOCAB, tiny_llama

        from core import adapter, lora

        model = tiny_llama(0, vocab_size=TOKENIZER_VOCAB)
        targets = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
        lora.inject_adapter(model, targets, rank=2, alpha=4)
        torch.manual_seed(1)
        with torch.no_grad():
            for _, layer in lora.lora_layers(model):
                layer.lora_B["default"].normal_(std=0.1)
        adapter.save_adapter(model, folder, base_model=str(self.checkpoint),
                             studio={"training": {"steps": 3, "final_loss": 1.5}, "loss_curve": [[1, 2.0], [2, 1.5]]})
        return folder

    @staticmethod
    def _zip(adapter: Path, path: Path) -> Path:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(adapter.iterdir()):
                zf.write(f, f"my-adapter/{f.name}")
        return path

    def _run_config(self, path: Path) -> Path:
        from core.config import RunConfig

        cfg = RunConfig()
        cfg.model.source = str(self.checkpoint)
        cfg.data.path = str(self.data["jsonl"])
        cfg.data.max_length = 64
        cfg.lora.rank, cfg.lora.targets = 2, "q_proj,v_proj"
        cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.device = 1, 2, 0, "cpu"
        cfg.save(path)
        return path

    def _run(self, out: Path) -> Path:
        """A finished 2-step run with a checkpoint at each step (``--resume --steps 3`` continues it)."""
        from studio import cli

        home = os.environ.get("LORA_STUDIO_HOME")
        os.environ["LORA_STUDIO_HOME"] = str(self.folder / "home")
        try:
            code = cli.run(["train", "--model", str(self.checkpoint), "--data", str(self.data["jsonl"]),
                            "--out", str(out), *TRAIN_FLAGS, "--steps", "2", "--save-every", "1"])
        finally:
            if home is None:
                os.environ.pop("LORA_STUDIO_HOME", None)
            else:
                os.environ["LORA_STUDIO_HOME"] = home
        assert code == 0, "the seed run did not train"
        return out

    @staticmethod
    def _gguf(path: Path) -> Path:
        from test_models import write_tiny_gguf

        return write_tiny_gguf(path)


# -- the targets -----------------------------------------------------------------------------------

def _cli(argv: list[str]) -> Callable[[], int]:
    def call() -> int:
        from studio import cli

        return cli.run(argv)
    return call


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def _mutate_file(path: Path, rng: random.Random) -> None:
    path.write_bytes(mutate_any(path.read_bytes(), rng, path.suffix.lower()))


def _mutate_one_of(folder: Path, rng: random.Random, names: list[str] | None = None) -> str:
    """Mutate one file of ``folder`` (or delete it, one time in ten); return what was done."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (names is None or p.name in names))
    f = rng.choice(files)
    if rng.random() < 0.1:
        f.unlink()
        return f"deleted {f.relative_to(folder)}"
    if f.suffix == ".safetensors" and rng.random() < 0.6:
        _mutate_safetensors_header(f, rng)
        return f"header of {f.relative_to(folder)}"
    _mutate_file(f, rng)
    return f"mutated {f.relative_to(folder)}"


def _mutate_safetensors_header(path: Path, rng: random.Random) -> None:
    """Lie in a safetensors header: shapes, offsets, dtypes, the length field, or bytes of the JSON."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    k = rng.choice(keys)
    choice = rng.randrange(6)
    if choice == 0:
        header[k]["shape"] = [rng.choice([0, 1, 3, 2**31, 2**40, -1]) for _ in range(rng.randint(0, 3))]
    elif choice == 1:
        header[k]["data_offsets"] = [rng.choice([0, 4, len(body), len(body) + 8, 2**62, -4]) for _ in range(2)]
    elif choice == 2:
        header[k]["dtype"] = rng.choice(["F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", 7])
    elif choice == 3:
        header[k] = rng.choice([None, [], "x", {"dtype": "F32"}])
    elif choice == 4:
        header[rng.choice(["base_model.model.x.lora_A.weight", "a" * 300, "__metadata__"])] = rng.choice(
            [header[k], {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, {"x": 1}])
    text = json.dumps(header).encode()
    if choice == 5:
        text = mutate(text, rng)
    length = len(text) if rng.random() < 0.8 else rng.choice([0, len(text) + 1, 2**63, len(raw)])
    path.write_bytes(length.to_bytes(8, "little", signed=False) + text + body)


class Target:
    """A reader under fuzz: ``make(seeds, root, rng)`` writes one mutated input under ``root`` and
    returns the :class:`Case` that runs it."""

    def __init__(self, name: str, make: Callable[[Seeds, Path, random.Random], Case]):
        self.name, self.make = name, make


def _data_target(fmt: str) -> Target:
    def make(seeds: Seeds, root: Path, rng: random.Random) -> Case:
        src = seeds.data[fmt]
        dst = _copy(src, root / "input" / src.name)
        what = _mutate_one_of(dst, rng) if dst.is_dir() else (_mutate_file(dst, rng) or f"mutated {src.name}")
        argv = ["data", str(dst), "--model", str(seeds.checkpoint), "--json", "--max-length", "48"]
        return Case(_cli(argv), [root / "home"], True, what)
    return Target(f"data-{fmt}", make)


def _train_data(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    fmt = rng.choice(["jsonl", "csv", "json"])
    dst = _copy(seeds.data[fmt], root / "input" / seeds.data[fmt].name)
    _mutate_file(dst, rng)
    argv = ["train", "--model", str(seeds.checkpoint), "--data", str(dst), "--out", str(root / "out"), *TRAIN_FLAGS]
    return Case(_cli(argv), [root / "home", root / "out"], True, f"train on mutated {dst.name}")


def _run_config(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    dst = _copy(seeds.run_config, root / "input" / "config.json")
    _mutate_file(dst, rng)
    # --model beside it: a config that lost its model names the bundled default, which is converted
    # and loaded in a fresh home each case (half a minute: slow, not a hang); model folders have their reader
    argv = ["train", "--config", str(dst), "--out", str(root / "out"), "--no-progress", "--steps", "1",
            "--model", str(seeds.checkpoint)]
    return Case(_cli(argv), [root / "home", root / "out"], True, "mutated run config.json")


def _adapter_folder(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    dst = _copy(seeds.adapter, root / "input" / "adapter")
    what = _mutate_one_of(dst, rng)
    argv = ["inspect", str(dst), "--json"] + (["--model", str(seeds.checkpoint)] if rng.random() < 0.5 else [])
    return Case(_cli(argv), [root / "home"], True, what)


def _adapter_import(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    dst = _copy(seeds.adapter, root / "input" / "adapter")
    what = _mutate_one_of(dst, rng)
    return Case(_cli(["library", "import", str(dst)]), [root / "home"], True, f"import: {what}")


def _adapter_zip(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    dst = _copy(seeds.zip, root / "input" / "adapter.zip")
    _mutate_file(dst, rng)
    return Case(_cli(["library", "import", str(dst)]), [root / "home"], True, "mutated zip bytes")


ZIP_NAMES = ["a/adapter_config.json", "a/adapter_model.safetensors", "a/studio.json", "a/entry.json",
             "adapter_config.json", "adapter_model.safetensors", "../adapter_config.json", "/abs/adapter_config.json",
             "a/../../adapter_model.safetensors", "C:/x/adapter_config.json", "a\\adapter_config.json",
             "b/adapter_config.json", "a/adapter_model.bin", "a/" + "d" * 300 + "/adapter_config.json",
             "a/\u00e9t\u00e9/adapter_config.json", "a/", "a/README.md"]
"""Member names a hostile zip may hold: the right ones, duplicates, absolute, ``..``, drive letters,
backslashes, very long, another adapter's, pickles."""


def zip_member_specs(rng: random.Random) -> list[tuple[str, str, bool]]:
    """A random zip's members: ``(name, content, is_link)``; content is one of :func:`_zip_content`'s."""
    return [(rng.choice(ZIP_NAMES), rng.choice(["config", "weights", "studio", "junk", "empty", "bomb", "json-deep"]),
             rng.random() < 0.1) for _ in range(rng.randint(0, 6))]


def _zip_content(seeds: Seeds, kind: str) -> bytes:
    return {"config": lambda: (seeds.adapter / "adapter_config.json").read_bytes(),
            "weights": lambda: (seeds.adapter / "adapter_model.safetensors").read_bytes(),
            "studio": lambda: (seeds.adapter / "studio.json").read_bytes(),
            "junk": lambda: bytes(range(256)) * 4, "empty": lambda: b"",
            "bomb": lambda: b"\0" * (40 << 20),
            "json-deep": lambda: b"[" * 100000 + b"]" * 100000}[kind]()


def build_zip(seeds: Seeds, path: Path, members: list[tuple[str, str, bool]]) -> Path:
    """Write a zip of ``members`` (see :func:`zip_member_specs`), duplicates and links included."""
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": that is the point
        for name, kind, link in members:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if link:
                info.external_attr = (0o120777 << 16)
                zf.writestr(info, b"/etc/passwd")
            else:
                zf.writestr(info, _zip_content(seeds, kind))
    return path


def _adapter_zip_structured(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    members = zip_member_specs(rng)
    dst = build_zip(seeds, root / "input" / "adapter.zip", members)
    return Case(_cli(["library", "import", str(dst)]), [root / "home"], True, f"zip of {members}")


def _model_folder(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    dst = _copy(seeds.checkpoint, root / "input" / "model")
    what = _mutate_one_of(dst, rng, ["config.json", "tokenizer.json", "tokenizer_config.json",
                                     "generation_config.json", "model.safetensors", "special_tokens_map.json"])
    which = rng.randrange(3)
    if which == 0:
        argv = ["targets", "--model", str(dst), "--json"]
    elif which == 1:
        argv = ["data", str(seeds.data["jsonl"]), "--model", str(dst), "--json", "--max-length", "48"]
    else:
        argv = ["inspect", str(seeds.adapter), "--model", str(dst), "--json"]
    return Case(_cli(argv), [root / "home"], True, f"{argv[0]}: {what}")


def _gguf(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    dst = _copy(seeds.gguf, root / "input" / "tiny.gguf")
    raw = dst.read_bytes()
    # most of the file is tensor data: aim the edits at the header and metadata (the first KiB or so)
    cut = rng.choice([64, 512, 4096, 16384])
    dst.write_bytes(mutate(raw[:cut], rng) + raw[cut:])
    argv = ["models", "show", str(dst), "--json"] if rng.random() < 0.7 else ["targets", "--model", str(dst), "--json"]
    return Case(_cli(argv), [root / "home"], True, f"{argv[0]}: gguf header, first {cut} bytes")


def _library_files(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    """The studio's own files as a crash could leave them: the index, an entry's entry.json or
    studio.json, truncated or damaged; then list, show and import beside it."""
    from core.library import Library

    home = root / "home"
    os.environ["LORA_STUDIO_HOME"] = str(home)
    lib = Library()
    if not lib.entries():
        lib.import_path(seeds.adapter, name="seed")
    entry = lib.entries()[0]
    files = [lib.index_path] + sorted(p for p in entry.path.iterdir() if p.suffix == ".json")
    f = rng.choice(files)
    if rng.random() < 0.2:
        f.write_bytes(f.read_bytes()[:rng.randrange(max(1, f.stat().st_size))])  # cut short, as by a crash
    else:
        _mutate_file(f, rng)
    argv = rng.choice([["library", "list", "--json"], ["library", "show", entry.id, "--json"],
                       ["library", "import", str(seeds.adapter)], ["inspect", entry.id, "--json"]])
    return Case(_cli(argv), [home], True, f"{' '.join(argv[:2])}: damaged {f.name}")


def _run_folder(seeds: Seeds, root: Path, rng: random.Random) -> Case:
    """A run folder as a crash (or a hostile copy) could leave it: a damaged checkpoint, status.json,
    metrics.jsonl or config.json; then resume it, or list and read it as the Compare page does."""
    out = root / "out"
    run = _copy(seeds.run, out / "run")
    files = sorted(p for p in run.rglob("*") if p.is_file() and "adapter" != p.parent.name)
    what = _mutate_one_of(run, rng, sorted({p.name for p in files}))
    if rng.random() < 0.5:
        call = _cli(["train", "--resume", "--out", str(run), "--steps", "3", "--no-progress"])
        return Case(call, [root / "home", out], True, f"resume: {what}")

    def read() -> None:
        from core import runs

        listed = runs.list_runs(out)
        runs.RunFolder(run).info()
        runs.read_metrics(run)
        assert len(listed) <= 1
    return Case(read, [root / "home", out], False, f"list/read: {what}")


TARGETS = [*(_data_target(f) for f in ("jsonl", "json", "csv", "tsv", "txt", "parquet", "disk")),
           Target("train-data", _train_data), Target("run-config", _run_config),
           Target("adapter-folder", _adapter_folder), Target("adapter-import", _adapter_import),
           Target("adapter-zip", _adapter_zip), Target("adapter-zip-members", _adapter_zip_structured),
           Target("model-folder", _model_folder),
           Target("gguf", _gguf), Target("library", _library_files), Target("run-folder", _run_folder)]
"""Every target, by name in :data:`BY_NAME`."""

BY_NAME = {t.name: t for t in TARGETS}


def run_case(target: Target, seeds: Seeds, root: Path, seed: int, *, bound: float = 60.0):
    """Make case ``seed`` of ``target`` under ``root`` (a fresh folder) and check it; return
    ``(outcome, description)``. ``LORA_STUDIO_HOME`` points into ``root`` while it runs."""
    import fuzzing

    root.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("LORA_STUDIO_HOME")
    os.environ["LORA_STUDIO_HOME"] = str(root / "home")
    try:
        case = target.make(seeds, root, random.Random(seed))
        outcome = fuzzing.check(case.call, root=root, writable=case.writable, bound=bound, cli=case.cli)
    finally:
        if old is None:
            os.environ.pop("LORA_STUDIO_HOME", None)
        else:
            os.environ["LORA_STUDIO_HOME"] = old
    return outcome, f"{target.name} seed {seed}: {case.what}"


# -- structured inputs (driven by hypothesis in tests/test_fuzz.py) ---------------------------------

GGUF_FIELDS = {"llama.context_length": 128, "llama.embedding_length": 32, "llama.feed_forward_length": 64,
               "llama.block_count": 2, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
               "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
               "llama.rope.dimension_count": 8}
"""A Llama GGUF's hyper-parameters, as llama.cpp writes them; :func:`write_gguf` overrides them."""


def _gguf_type(value):
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return T.BOOL, None
    if isinstance(value, int):
        return (T.INT64 if value < 0 else T.UINT64 if value >= 2**32 else T.UINT32), None
    if isinstance(value, float):
        return T.FLOAT32, None
    if isinstance(value, str):
        return T.STRING, None
    sub = _gguf_type(value[0])[0] if value else T.UINT32
    return T.ARRAY, sub


def write_gguf(path: Path, overrides: dict, n_tensors: int = 1) -> Path:
    """A small Llama GGUF whose metadata is :data:`GGUF_FIELDS` with ``overrides`` (any key, any
    type: ints, floats, text, lists, booleans; ``None`` drops the key), a 300-token vocabulary and
    ``n_tensors`` small tensors."""
    import gguf
    import numpy as np

    fields = {**GGUF_FIELDS, **overrides}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if value is not None:
            vtype, sub = _gguf_type(value)
            w.add_key_value(key, value, vtype, sub_type=sub)
    tokens = [f"t{i}" for i in range(300)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(["t 1"])
    for i in range(n_tensors):
        w.add_tensor("token_embd.weight" if i == 0 else f"blk.{i}.attn_q.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def structured_case(seeds: Seeds, root: Path, kind: str, value) -> Case:
    """One structured case: ``kind`` is ``adapter-config`` (``value``: adapter_config.json's fields to
    set), ``run-config`` (a run config.json's sections to merge in), ``zip`` (members, see
    :func:`zip_member_specs`) or ``gguf`` (metadata overrides)."""
    inp = root / "input"
    inp.mkdir(parents=True, exist_ok=True)
    if kind == "adapter-config":
        dst = _copy(seeds.adapter, inp / "adapter")
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(value)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
        return Case(_cli(["inspect", str(dst), "--model", str(seeds.checkpoint), "--json"]), [root / "home"], True,
                    f"adapter_config.json with {value!r:.200}")
    if kind == "run-config":
        cfg = json.loads(seeds.run_config.read_text())
        for section, fields in value.items():
            if isinstance(cfg.get(section), dict) and isinstance(fields, dict):
                cfg[section].update(fields)
            else:
                cfg[section] = fields
        dst = inp / "config.json"
        dst.write_text(json.dumps(cfg))
        argv = ["train", "--config", str(dst), "--out", str(root / "out"), "--no-progress", "--steps", "1",
                "--model", str(seeds.checkpoint)]
        return Case(_cli(argv), [root / "home", root / "out"], True, f"config.json with {value!r:.200}")
    if kind == "zip":
        dst = build_zip(seeds, inp / "adapter.zip", value)
        return Case(_cli(["library", "import", str(dst)]), [root / "home"], True, f"zip of {value!r:.200}")
    if kind == "gguf":
        dst = write_gguf(inp / "model.gguf", value)
        return Case(_cli(["models", "show", str(dst), "--json"]), [root / "home"], True, f"gguf with {value!r:.200}")
    raise ValueError(kind)
