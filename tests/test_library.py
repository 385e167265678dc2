"""The adapter library: folders as truth, the index as a cache, names that cannot escape, trash,
import/export round trips, and the compatibility check. Tiny models only."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from core.errors import StudioError
from core.library import Library, clean_name, slugify

import peft
import core.adapter as adapter_io


def peft_adapter(folder: Path, model=None, *, targets=("q_proj", "v_proj"), r=4, alpha=8, seed=1, **extra) -> Path:
    """A PEFT-written adapter folder with random (non-zero) B, for ``model`` (a tiny Llama by default)."""
    model = model if model is not None else tiny_llama()
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **extra))
    pm.save_pretrained(folder)
    return Path(folder)


def studio_adapter(folder: Path, model=None, *, r=4, seed=2, studio=None) -> Path:
    """An adapter written by core.adapter.save_adapter (the studio's own format, with studio.json)."""
    from core import lora

    model = copy.deepcopy(model if model is not None else tiny_llama())
    targets = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    lora.inject_adapter(model, targets, rank=r, alpha=2 * r)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.1)
    adapter_io.save_adapter(model, folder, base_model="tiny-llama", studio=studio)
    return Path(folder)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture
def lib(tmp_path):
    return Library(tmp_path / "lib")


# -- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("My Adapter", "my-adapter"),
    ("../../etc/passwd", "etc-passwd"),
    ("..", "adapter"),
    (".hidden", "hidden"),
    ("/abs/path", "abs-path"),
    ("C:\\Windows\\system32", "c-windows-system32"),
    ("a/b\\c", "a-b-c"),
    ("CON", "con-adapter"),
    ("nul.txt", "nul-adapter.txt"),
    ("com1", "com1-adapter"),
    ("LPT9", "lpt9-adapter"),
    ("name. ", "name"),
    ("trailing...", "trailing"),
    ("tab\there\x00nul\x1b[31m", "tab-here-nul-31m"),
    ("Café ünïcode", "cafe-unicode"),
    ("", "adapter"),
    ("x" * 300, "x" * 64),
])
def test_slugify_cannot_escape_or_collide_with_reserved_names(name, expected):
    slug = slugify(name)
    assert slug == expected
    assert "/" not in slug and "\\" not in slug and not slug.startswith(".") and slug not in (".", "..")
    assert slug == slugify(slug)  # stable: an id is its own slug


def test_clean_name_strips_control_characters_and_refuses_empty():
    assert clean_name("  a\tname\x00 with\x1b junk \n") == "a name with junk"
    with pytest.raises(StudioError, match="empty"):
        clean_name(" \x00\n ")


def test_names_are_sanitised_in_the_library(lib, tmp_path):
    src = peft_adapter(tmp_path / "a")
    for i, evil in enumerate(["../../escape", "/etc/passwd", "CON", "a\\b", "trailing. . "]):
        e = lib.import_path(src, name=evil if i != 2 else "CON")
        assert e.path.parent == lib.adapters_dir, e.path
        assert e.path.resolve().is_relative_to(lib.adapters_dir.resolve())
    assert not (tmp_path / "escape").exists() and not (lib.root.parent / "escape").exists()
    ids = sorted(e.id for e in lib.entries())
    assert ids == sorted(["escape", "etc-passwd", "con-adapter", "a-b", "trailing"])
    names = {e.name for e in lib.entries()}
    assert "../../escape" in names and "trailing. ." in names  # display names keep what the user typed
    with pytest.raises(StudioError, match="not an adapter id"):
        lib.get("../escape")


# -- import, list, edit ----------------------------------------------------------------------------

def test_import_peft_folder_records_shapes(lib, tmp_path):
    src = peft_adapter(tmp_path / "peft-adapter", r=4, alpha=8)
    e = lib.import_path(src)
    assert e.name == "peft-adapter" and e.id == "peft-adapter"
    assert e.rank == 4 and e.alpha == 8.0 and e.targets == ["q_proj", "v_proj"] and e.modules == 4
    # q: 4x32 + 32x4, v: 4x32 + 16x4 (GQA: 2 kv heads of 8) per layer, 2 layers
    assert e.trainable_params == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert e.size_bytes > 0 and e.created and e.imported_from == str(src.resolve())
    assert sorted(p.name for p in e.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "entry.json"]
    assert same_tensors(src, e.path)
    [listed] = lib.entries()
    assert listed.id == e.id and listed.rank == 4
    again = lib.import_path(src)  # the same folder again: a second entry, with a distinct name and id
    assert (again.name, again.id) == ("peft-adapter (2)", "peft-adapter-2")


def test_import_studio_folder_keeps_provenance(lib, tmp_path):
    src = studio_adapter(tmp_path / "ours", studio={"dataset": {"path": "data.jsonl", "hash": "ab" * 32},
                                                    "loss_curve": [[1, 2.5], [2, 2.0], [3, 1.5]]})
    e = lib.import_path(src, name="Mine")
    assert (e.path / "studio.json").is_file()
    assert e.base_model == "tiny-llama" and e.rank == 4
    got = lib.get(e.id)
    assert got.name == "Mine"
    assert got.dataset.get("path") == "data.jsonl"
    assert got.loss_curve == [[1, 2.5], [2, 2.0], [3, 1.5]] and got.loss == 1.5


def test_refuses_what_the_studio_cannot_run(lib, tmp_path):
    dora = peft_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(StudioError, match="(?i)dora"):
        lib.import_path(dora)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(StudioError, match="pickle"):
        lib.import_path(tmp_path / "pickled")
    with pytest.raises(StudioError, match="no adapter_config.json"):
        lib.import_path(tmp_path)
    with pytest.raises(StudioError, match="no such"):
        lib.import_path(tmp_path / "missing")
    assert lib.entries() == [] and [p.name for p in lib.adapters_dir.iterdir()] == []


def test_rename_notes_search_sort_filter(lib, tmp_path):
    a = lib.import_path(peft_adapter(tmp_path / "a", r=2), name="Alpha")
    b = lib.import_path(peft_adapter(tmp_path / "b", r=8), name="beta")
    lib.set_notes("beta", "trained on 100% cheese_data")
    renamed = lib.rename("Alpha", "Zulu")
    assert renamed.id == a.id and renamed.name == "Zulu" and lib.resolve("zulu").id == a.id
    with pytest.raises(StudioError, match="already"):
        lib.rename(a.id, "BETA")
    with pytest.raises(StudioError, match="no adapter named"):
        lib.resolve("Alpha")
    assert [e.name for e in lib.search("cheese")] == ["beta"]
    assert [e.name for e in lib.search("100%")] == ["beta"] and lib.search("%x%") == []
    assert [e.name for e in lib.search("_data")] == ["beta"] and lib.search("trained_on") == []  # _ is literal
    assert [e.name for e in lib.search(rank=2)] == ["Zulu"]
    assert [e.name for e in lib.search(sort="name")] == ["beta", "Zulu"]
    assert [e.name for e in lib.search(sort="rank")] == ["Zulu", "beta"]
    assert [e.name for e in lib.search(sort="size", descending=True)] == ["beta", "Zulu"]
    assert lib.get(b.id).notes == "trained on 100% cheese_data"
    with pytest.raises(StudioError, match="sort"):
        lib.search(sort="colour")


def test_remove_to_trash_restore_and_empty(lib, tmp_path):
    e = lib.import_path(peft_adapter(tmp_path / "a"), name="keeper")
    t = lib.remove("keeper")
    assert lib.entries() == [] and [x.name for x in lib.trash()] == ["keeper"]
    assert t.path.parent == lib.trash_dir and t.trashed
    back = lib.restore("keeper")
    assert back.id == e.id and back.name == "keeper" and not back.trashed
    assert same_tensors(tmp_path / "a", back.path) and lib.trash() == []
    # a name taken while the entry was in the trash: restored under another
    lib.remove(e.id)
    lib.import_path(peft_adapter(tmp_path / "b"), name="keeper")
    restored = lib.restore("keeper")
    assert restored.name == "keeper (2)" and restored.id != e.id
    lib.remove(restored.id)
    lib.remove("keeper")
    assert len(lib.trash()) == 2
    assert lib.empty_trash() == 2 and lib.trash() == [] and list(lib.trash_dir.iterdir()) == []
    with pytest.raises(StudioError, match="trash"):
        lib.restore("keeper")


def test_export_folder_and_zip_then_reimport_is_identical(lib, tmp_path):
    src = studio_adapter(tmp_path / "src")
    e = lib.import_path(src, name="round trip")
    lib.set_notes(e.id, "kept across export")
    folder = lib.export(e.id, tmp_path / "out" / "exported")
    assert same_tensors(src, folder)
    # PEFT itself loads the exported folder
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(folder))
    assert model is not None
    z = lib.export("round trip", tmp_path / "out" / "exported", zip=True)
    assert z.name == "exported.zip" and zipfile.is_zipfile(z)
    with pytest.raises(StudioError, match="already exists"):
        lib.export(e.id, folder)
    other = Library(tmp_path / "other")
    from_folder = other.import_path(folder)
    from_zip = other.import_path(z)
    for got in (from_folder, from_zip):
        assert same_tensors(src, got.path)
        assert got.notes == "kept across export" and got.name.startswith("round trip")
    assert from_zip.imported_from == str(z.resolve())


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_export_is_a_clean_peft_folder_with_normal_permissions(lib, tmp_path, mask):
    """No entry.json (the library's own record) in an export; 0o777/0o666 less the umask, as a plain
    mkdir and open() would make them, not tempfile's 0o700/0o600."""
    import stat

    e = lib.import_path(studio_adapter(tmp_path / "src"), name="clean")
    old = os.umask(mask)
    try:
        folder = lib.export(e.id, tmp_path / "out" / "clean")
        z = lib.export(e.id, tmp_path / "out" / "clean.zip", zip=True)
    finally:
        os.umask(old)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "studio.json"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~mask}
    assert stat.S_IMODE(z.stat().st_mode) == 0o666 & ~mask
    with zipfile.ZipFile(z) as zf:
        assert sorted(i.filename for i in zf.infolist()) == [f"{e.id}/adapter_config.json",
                                                             f"{e.id}/adapter_model.safetensors",
                                                             f"{e.id}/studio.json"]
        assert {stat.S_IMODE(i.external_attr >> 16) for i in zf.infolist()} == {0o666 & ~mask}
    assert json.loads((folder / "studio.json").read_text())["name"] == "clean"


# -- zips ------------------------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return path


def test_zip_slip_and_links_are_refused(lib, tmp_path):
    src = peft_adapter(tmp_path / "a")
    files = {n: (src / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    bad = _zip(tmp_path / "slip.zip", {f"../../evil/{n}": d for n, d in files.items()})
    with pytest.raises(StudioError, match="outside"):
        lib.import_path(bad)
    bad = _zip(tmp_path / "abs.zip", {"/tmp/evil/adapter_config.json": files["adapter_config.json"],
                                      "adapter_model.safetensors": files["adapter_model.safetensors"]})
    with pytest.raises(StudioError, match="outside"):
        lib.import_path(bad)
    link = _zip(tmp_path / "link.zip", {"adapter_config.json": files["adapter_config.json"]},
                symlink="adapter_model.safetensors")
    with pytest.raises(StudioError, match="link"):
        lib.import_path(link)
    two = _zip(tmp_path / "two.zip", {f"{d}/{n}": b for d in ("x", "y") for n, b in files.items()})
    with pytest.raises(StudioError, match="2 adapters"):
        lib.import_path(two)
    (tmp_path / "notzip.zip").write_bytes(b"nope")
    with pytest.raises(StudioError, match="not a zip"):
        lib.import_path(tmp_path / "notzip.zip")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil/adapter_config.json").exists()
    assert lib.entries() == [] and list(lib.adapters_dir.iterdir()) == []  # no staging left behind
    # a good zip with the files in a subfolder and junk beside them: only the adapter files are taken
    good = _zip(tmp_path / "good.zip", {**{f"pack/{n}": b for n, b in files.items()},
                                        "pack/README.md": b"hi", "pack/optimizer.pt": b"pickle"})
    e = lib.import_path(good)
    assert e.name == "good" and same_tensors(src, e.path)
    assert sorted(p.name for p in e.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "entry.json"]


def test_zip_bomb_member_is_refused(lib, tmp_path, monkeypatch):
    import core.library as library
    import core.library_zip as library_zip

    src = peft_adapter(tmp_path / "a")
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", (src / "adapter_config.json").read_bytes())
        zf.writestr("adapter_model.safetensors", b"\0" * (8 << 20))
    with pytest.raises(StudioError, match="zip bomb"):
        lib.import_path(z)
    monkeypatch.setattr(library_zip, "MAX_FILE_BYTES", 1000)
    with pytest.raises(StudioError, match="limit"):
        lib.import_path(z)


# -- the index is a cache ------------------------------------------------------------------------------

def _snapshot(lib: Library):
    return [(e.id, e.name, e.notes, e.rank, e.trainable_params) for e in lib.search(sort="name")]


def test_index_rebuilt_when_deleted_corrupt_or_old(lib, tmp_path):
    lib.import_path(peft_adapter(tmp_path / "a", r=2), name="one")
    lib.import_path(peft_adapter(tmp_path / "b", r=4), name="two")
    lib.set_notes("two", "notes survive")
    before = _snapshot(lib)
    assert lib.index_path.is_file()
    lib.index_path.unlink()
    assert _snapshot(Library(lib.root)) == before
    lib.index_path.write_bytes(b"this is not a database" * 100)
    assert _snapshot(Library(lib.root)) == before
    raw = bytearray(lib.index_path.read_bytes())  # a torn page past a valid header (a crash mid-write)
    assert len(raw) >= 8192
    raw[4096:8192] = b"\xff" * 4096
    lib.index_path.write_bytes(bytes(raw))
    assert _snapshot(Library(lib.root)) == before
    con = sqlite3.connect(lib.index_path)
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    assert _snapshot(Library(lib.root)) == before
    con = sqlite3.connect(lib.index_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] > 1
    con.execute("DELETE FROM entries")  # a stale index (rows lost): folders win again
    con.commit()
    con.close()
    assert _snapshot(Library(lib.root)) == before
    assert lib.rebuild_index() == 2


def test_index_follows_changes_made_by_another_process(lib, tmp_path):
    e = lib.import_path(peft_adapter(tmp_path / "a"), name="one")
    other = Library(lib.root)
    other.rename("one", "renamed elsewhere")
    assert [x.name for x in lib.entries()] == ["renamed elsewhere"]
    import shutil
    shutil.rmtree(e.path)  # deleted by hand
    assert lib.entries() == []


def test_half_written_and_broken_folders_are_never_listed(lib, tmp_path):
    src = peft_adapter(tmp_path / "a")
    ok = lib.import_path(src, name="complete")
    # what a crash during import leaves: a staged folder (core.atomic.staged_folder's naming)
    partial = lib.adapters_dir / ".crashed.partial-x1y2"
    partial.mkdir()
    for n in ("adapter_config.json", "adapter_model.safetensors"):
        (partial / n).write_bytes((src / n).read_bytes())
    (partial / "entry.json").write_text(json.dumps({"id": "crashed", "name": "crashed"}))
    # a folder whose weights never arrived
    (lib.adapters_dir / "no-weights").mkdir()
    (lib.adapters_dir / "no-weights" / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    # a folder with an unsafe name put there by hand
    (lib.adapters_dir / "Bad Name").mkdir()
    for n in ("adapter_config.json", "adapter_model.safetensors"):
        (lib.adapters_dir / "Bad Name" / n).write_bytes((src / n).read_bytes())
    lib.index_path.unlink()
    assert [e.id for e in Library(lib.root).entries()] == [ok.id]
    # a PEFT folder dropped in by hand under a safe name is adopted as an entry
    dropped = lib.adapters_dir / "dropped"
    dropped.mkdir()
    for n in ("adapter_config.json", "adapter_model.safetensors"):
        (dropped / n).write_bytes((src / n).read_bytes())
    assert sorted(e.id for e in lib.entries()) == ["complete", "dropped"]
    assert (dropped / "entry.json").is_file()


def test_failed_import_leaves_nothing(lib, tmp_path, monkeypatch):
    import core.library as library

    src = peft_adapter(tmp_path / "a")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(library, "_describe", boom)
    with pytest.raises(OSError):
        lib.import_path(src)
    monkeypatch.undo()
    assert lib.entries() == [] and list(lib.adapters_dir.iterdir()) == []


# -- runs ------------------------------------------------------------------------------------------

def test_adopt_run_reads_the_curve_from_metrics(lib, tmp_path):
    run = tmp_path / "run-7"
    peft_adapter(run / "adapter")
    (run / "config.json").write_text(json.dumps({"model": {"source": "default"},
                                                 "data": {"path": "/data/train.jsonl", "format": "chat"},
                                                 "name": "my run"}))
    rows = [{"step": i, "loss": 3.0 - 0.1 * i, "lr": 1e-4, "tokens": 100 * i, "step_seconds": 0.5}
            for i in range(1, 11)]
    rows.insert(5, {"step": 5, "eval_loss": 2.2})
    rows.append({"step": 10, "eval_loss": 2.05})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 11, \"lo")
    e = lib.adopt_run(run)
    assert e.name == "my run" and e.base_model == "default"
    assert e.dataset == {"path": "/data/train.jsonl", "format": "chat"}
    assert len(e.loss_curve) == 10 and e.loss_curve[-1] == [10, pytest.approx(2.0)]
    assert e.eval_curve == [[5, 2.2], [10, 2.05]]
    assert e.training["steps"] == 10 and e.training["best_eval_loss"] == 2.05
    assert e.training["duration_seconds"] == pytest.approx(5.0) and e.loss == 2.05
    assert lib.adopt_run(run).id == e.id and len(lib.entries()) == 1  # adopting twice: one entry
    assert lib.import_path(run).id == e.id  # a run folder given to import is adopted
    with pytest.raises(StudioError, match="no finished adapter"):
        lib.adopt_run(tmp_path)


# -- compatibility -----------------------------------------------------------------------------------

def test_check_refuses_other_shapes_and_warns_on_other_weights(lib, tmp_path):
    from core import models

    base = tiny_llama(seed=0)
    e = lib.add_folder(peft_adapter(tmp_path / "a", base), extra={"base_fingerprint": models.fingerprint(base)})
    assert lib.check(e, base) == ([], [])
    assert lib.check(e.id, base) == ([], [])
    problems, warnings = lib.check(e, tiny_llama(seed=5))  # same shapes, other weights
    assert problems == [] and len(warnings) == 1 and "different weights" in warnings[0]
    problems, warnings = lib.check(e, tiny_llama(hidden_size=48))  # other shapes: refused, no traceback
    assert problems and warnings == []
    assert any("q_proj" in p or "shape" in p for p in problems)
    problems, _ = lib.check(e, tiny_llama(num_hidden_layers=1))  # a target module the model lacks
    assert problems
    # without a recorded fingerprint (a PEFT folder) only the shapes can be checked
    plain = lib.import_path(tmp_path / "a")
    assert lib.check(plain, tiny_llama(seed=5)) == ([], [])


def test_merge_unmerge_cycles_do_not_make_an_adapter_look_foreign(lib, tmp_path):
    """An fp32 merge/unmerge leaves W off by fp32 rounding, enough to flip the content hash's bf16
    rounding somewhere in a 256-wide model: the check uses the fingerprint taken at load; a bf16
    model's fingerprint is the same merged or not (LoRALinear.base_weight)."""
    from conftest import TOKENIZER_VOCAB, tiny_tokenizer
    from core import lora, models, targets

    folder = tmp_path / "wide-llama"
    tiny_llama(vocab_size=TOKENIZER_VOCAB, hidden_size=256, intermediate_size=512).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    loaded = models.load_model(str(folder), device="cpu", precision="fp32")
    e = lib.add_folder(studio_adapter(tmp_path / "a", loaded.model, r=8, seed=3))
    assert lib.check(e, loaded) == ([], [])
    names = targets.resolve_targets(loaded.model, "all-linear")
    lora.inject_adapter(loaded.model, names, "cycled", rank=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(loaded.model):
            layer.lora_B["cycled"].copy_(torch.randn(layer.lora_B["cycled"].shape, generator=g))
    for _ in range(3):
        lora.merge_adapter(loaded.model, "cycled")
        assert lib.check(e, loaded) == ([], [])
        lora.unmerge_adapter(loaded.model, "cycled")
    assert models.fingerprint(loaded.model)["content"] != loaded.fingerprint["content"]  # the drift is real
    assert lib.check(e, loaded) == ([], [])  # ... and does not count
    assert lib.check(e, tiny_llama(seed=5, vocab_size=TOKENIZER_VOCAB, hidden_size=256,
                                   intermediate_size=512))[1]  # other weights still warn

    bf16 = models.load_model(str(folder), device="cpu", precision="bf16").model
    before = models.fingerprint(bf16)
    lora.inject_adapter(bf16, names, "cycled", rank=8)
    with torch.no_grad():
        for _, layer in lora.lora_layers(bf16):
            layer.lora_B["cycled"].normal_(generator=g)
    lora.merge_adapter(bf16, "cycled")
    assert models.fingerprint(bf16) == before  # hashed as loaded while merged


# -- command line ----------------------------------------------------------------------------------

def _cli(*args):
    from studio.cli import run

    return run(list(args))


def test_library_commands(tmp_path, capsys):
    src = peft_adapter(tmp_path / "adapter")
    assert _cli("library", "import", str(src), "--name", "First") == 0
    assert "imported 'First'" in capsys.readouterr().out
    assert _cli("library", "list", "--json") == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["name"] == "First" and row["rank"] == 4 and row["id"] == "first"
    assert _cli("library", "rename", "First", "Second") == 0
    assert _cli("library", "notes", "second", "some notes") == 0
    capsys.readouterr()
    assert _cli("library", "notes", "Second") == 0 and capsys.readouterr().out.strip() == "some notes"
    assert _cli("library", "list") == 0
    out = capsys.readouterr().out
    assert "Second" in out and "q_proj,v_proj" in out
    assert _cli("library", "show", "Second") == 0 and "some notes" in capsys.readouterr().out
    assert _cli("library", "export", "Second", str(tmp_path / "x"), "--zip") == 0
    assert (tmp_path / "x.zip").is_file()
    assert _cli("library", "remove", "Second") == 0
    assert _cli("library", "trash", "--json") == 0
    capsys.readouterr()
    assert _cli("library", "restore", "Second") == 0
    assert _cli("library", "remove", "Second") == 0
    assert _cli("library", "empty-trash") == 0 and "deleted 1 adapter" in capsys.readouterr().out
    assert _cli("library", "list") == 0 and "empty" in capsys.readouterr().out
    assert _cli("library", "rename", "nothing", "x") == 1
    assert capsys.readouterr().err.startswith("error: no adapter named 'nothing'")


def test_library_errors_are_one_line_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "studio", "library", "import", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr


def test_a_trained_run_enters_the_library_with_its_provenance(tmp_path):
    """End to end: the trainer's run folder is adopted, its fingerprint lets check() tell the base it
    was trained on from another with the same shapes, and the entry merges by name."""
    from conftest import tiny_checkpoint
    from core import models
    from core.config import RunConfig
    from core.train import Trainer

    ckpt = tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"number {i}"}) for i in range(12)))
    cfg = RunConfig()
    cfg.model.source, cfg.model.device = str(ckpt), "cpu"
    cfg.data.path, cfg.data.val_split, cfg.data.max_length = str(data), 0.25, 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.save_every = 3, 2, 3, 0
    cfg.lora.rank, cfg.lora.targets = 2, "attention-qv"
    cfg.out, cfg.name = str(tmp_path / "run"), "trained here"
    result = Trainer(cfg).run()
    lib = Library()
    e = lib.adopt_run(result.out)
    assert e.name == "trained here" and e.base_model == str(ckpt) and e.rank == 2
    assert [s for s, _ in e.loss_curve] == [1, 2, 3] and len(e.eval_curve) == 1
    assert e.training["steps"] == 3 and e.loss == e.training["best_eval_loss"]
    assert e.dataset["path"] == str(data) and len(e.dataset["hash"]) == 64
    assert e.base_fingerprint and e.base_fingerprint["content"]
    base = models.load_model(str(ckpt), device="cpu", precision="fp32")
    assert lib.check(e, base) == ([], [])
    other = tiny_checkpoint(tmp_path / "other", seed=3)
    problems, warnings = lib.check(e, models.load_model(str(other), device="cpu", precision="fp32"))
    assert problems == [] and "different weights" in warnings[0]
    from studio.cli import run

    assert run(["merge", "--model", str(ckpt), "--adapter", "trained here", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
