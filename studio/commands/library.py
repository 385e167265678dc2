"""``lora-studio library``: the adapters the window's library page shows, from the command line."""

from __future__ import annotations

import argparse
import json

_NAME_HELP = "the adapter's name or id (as 'library list' shows them)"


def register(sub) -> None:
    lib = sub.add_parser(
        "library", help="list and manage the adapter library (import, export, rename, remove, trash)",
        description="The adapter library: every finished run's adapter, plus adapters you import. "
                    "Entries are named by their display name or their id (the folder name); "
                    "removed entries go to a trash until it is emptied. Set LORA_STUDIO_HOME to use "
                    "another library.")
    cmds = lib.add_subparsers(dest="library_command", metavar="ACTION")
    lib.set_defaults(func=lambda args: _usage(lib))

    p = cmds.add_parser("list", help="list the adapters in the library",
                        description="List the adapters in the library, newest first (the window shows the same).")
    p.add_argument("--search", metavar="TEXT", help="only entries whose name or notes contain TEXT")
    p.add_argument("--model", metavar="M", help="only adapters trained on this base model")
    p.add_argument("--rank", type=int, help="only adapters of this rank")
    p.add_argument("--sort", default="created", choices=("name", "created", "loss", "rank", "size"),
                   help="sort order (default: created, newest first; loss and name ascending)")
    p.add_argument("--json", action="store_true", help="print JSON (loss curves included) instead of a table")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("show", help="everything recorded about one adapter",
                        description="Print one entry: provenance, shapes, training summary, notes.")
    p.add_argument("entry", metavar="NAME_OR_ID", help=_NAME_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_show)

    p = cmds.add_parser("import", help="add an adapter folder (ours or PEFT's), a .zip of one, or a run folder",
                        description="Copy an adapter into the library: a folder holding adapter_config.json "
                                    "and adapter_model.safetensors (written by the studio or by PEFT), a .zip "
                                    "of such a folder, or a run folder (its adapter/ and loss curve). "
                                    "DoRA and other variants the studio cannot run are refused.")
    p.add_argument("path", metavar="PATH", help="adapter folder, .zip file or run folder")
    p.add_argument("--name", help="display name (default: the recorded name or the folder's name)")
    p.set_defaults(func=cmd_import)

    p = cmds.add_parser("export", help="write an adapter as a PEFT folder or a .zip",
                        description="Write an entry as a folder PEFT loads with PeftModel.from_pretrained "
                                    "(plus studio.json and entry.json, which PEFT ignores), or a .zip of it.")
    p.add_argument("entry", metavar="NAME_OR_ID", help=_NAME_HELP)
    p.add_argument("dest", metavar="DEST", help="the folder (or .zip file) to create; must not exist")
    p.add_argument("--zip", action="store_true", help="write a .zip file instead of a folder")
    p.set_defaults(func=cmd_export)

    p = cmds.add_parser("rename", help="give an adapter a new display name (its id stays)")
    p.add_argument("entry", metavar="OLD", help=_NAME_HELP)
    p.add_argument("new", metavar="NEW", help="the new display name (unique in the library)")
    p.set_defaults(func=cmd_rename)

    p = cmds.add_parser("notes", help="show or replace an adapter's notes")
    p.add_argument("entry", metavar="NAME_OR_ID", help=_NAME_HELP)
    p.add_argument("text", metavar="TEXT", nargs="?", help="the new notes ('' clears them); omit to print them")
    p.set_defaults(func=cmd_notes)

    p = cmds.add_parser("remove", help="move an adapter to the trash (recoverable with 'restore')")
    p.add_argument("entry", metavar="NAME_OR_ID", help=_NAME_HELP)
    p.set_defaults(func=cmd_remove)

    p = cmds.add_parser("trash", help="list what is in the trash")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_trash)

    p = cmds.add_parser("restore", help="bring an adapter back from the trash")
    p.add_argument("entry", metavar="NAME_OR_TRASH_ID", help="its name or its id in the trash ('library trash')")
    p.set_defaults(func=cmd_restore)

    p = cmds.add_parser("empty-trash", help="delete what is in the trash for good")
    p.add_argument("entry", metavar="NAME_OR_TRASH_ID", nargs="?", help="only this one (default: everything)")
    p.set_defaults(func=cmd_empty_trash)

    from studio.commands.library_combine import register_combine  # combine: as the window's Library does

    register_combine(cmds)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _library():
    from core.library import Library

    return Library()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(entries, *, trash: bool = False) -> None:
    if not entries:
        print("the trash is empty" if trash else "the library is empty (import an adapter or train one)")
        return
    rows = [("ID", "NAME", "BASE MODEL", "RANK", "TARGETS", "LOSS", "SIZE", "REMOVED" if trash else "CREATED")]
    for e in entries:
        base = e.base_model if len(e.base_model) <= 28 else "…" + e.base_model[-27:]
        targets = ",".join(e.targets)
        targets = targets if len(targets) <= 24 else targets[:23] + "…"
        rows.append((e.id, e.name, base or "?", str(e.rank or "?"), targets,
                     f"{e.loss:.4f}" if e.loss is not None else "-", _size(e.size_bytes),
                     ((e.trashed if trash else e.created) or "")[:16].replace("T", " ")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_list(args) -> int:
    entries = _library().search(args.search, base_model=args.model, rank=args.rank, sort=args.sort)
    if args.json:
        print(json.dumps([dict(e.to_dict(), path=str(e.path)) for e in entries], indent=2, default=str))
    else:
        _table(entries)
    return 0


def cmd_show(args) -> int:
    e = _library().resolve(args.entry)
    if args.json:
        print(json.dumps(dict(e.to_dict(), path=str(e.path)), indent=2, default=str))
        return 0
    t = e.training or {}
    lines = [
        ("name", e.name), ("id", e.id), ("folder", str(e.path)), ("created", e.created),
        ("imported from", e.imported_from), ("base model", e.base_model or "?"),
        ("rank / alpha", f"{e.rank} / {e.alpha:g}{' (rsLoRA)' if e.rslora else ''}" if e.alpha is not None else str(e.rank)),
        ("targets", f"{', '.join(e.targets)} ({e.modules} modules)"),
        ("trainable parameters", f"{e.trainable_params:,}"), ("size", _size(e.size_bytes)),
        ("dataset", e.dataset.get("path", "-") + (f" (sha256 {e.dataset['hash'][:12]})" if e.dataset.get("hash") else "")),
        ("training", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in t.items()
                               if isinstance(v, (int, float, str)) and v != "") or "-"),
        ("loss curve", f"{len(e.loss_curve)} points" + (f", {len(e.eval_curve)} evaluations" if e.eval_curve else "")),
        ("notes", e.notes or "-"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    return 0


def cmd_import(args) -> int:
    e = _library().import_path(args.path, name=args.name)
    print(f"imported '{e.name}' (id {e.id}): rank {e.rank}, {e.modules} modules, {e.trainable_params:,} parameters")
    return 0


def cmd_export(args) -> int:
    out = _library().export(args.entry, args.dest, zip=args.zip)
    print(f"wrote {out}")
    return 0


def cmd_rename(args) -> int:
    e = _library().rename(args.entry, args.new)
    print(f"renamed to '{e.name}' (id {e.id})")
    return 0


def cmd_notes(args) -> int:
    lib = _library()
    if args.text is None:
        e = lib.resolve(args.entry)
        if e.notes:
            print(e.notes)
        return 0
    e = lib.set_notes(args.entry, args.text)
    print(f"notes of '{e.name}' {'saved' if e.notes else 'cleared'}")
    return 0


def cmd_remove(args) -> int:
    e = _library().remove(args.entry)
    print(f"moved '{e.name}' to the trash (restore it with: lora-studio library restore {e.id})")
    return 0


def cmd_trash(args) -> int:
    items = _library().trash()
    if args.json:
        print(json.dumps([dict(e.to_dict(curves=False), path=str(e.path)) for e in items], indent=2, default=str))
    else:
        _table(items, trash=True)
    return 0


def cmd_restore(args) -> int:
    e = _library().restore(args.entry)
    print(f"restored '{e.name}' (id {e.id})")
    return 0


def cmd_empty_trash(args) -> int:
    n = _library().empty_trash(args.entry)
    print(f"deleted {n} adapter{'s' if n != 1 else ''} for good")
    return 0

