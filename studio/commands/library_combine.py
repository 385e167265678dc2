"""``lora-studio library combine``: several library adapters combined into a new library entry, as the
window's Library does (core.combine.combine_into_library: the same weights, modes and provenance)."""

from __future__ import annotations

import json


def register_combine(cmds) -> None:
    """Add ``combine`` to the ``library`` command's actions."""
    from studio.commands.merge import add_combine_options

    p = cmds.add_parser(
        "combine", help="combine adapters of the library into a new entry",
        description="Combine two or more adapters of the library (weighted, exactly or by SVD/TIES/DARE "
                    "to one rank) into a new library entry that records where it came from, as the "
                    "window's Library does.",
        epilog="example: lora-studio library combine orders tone --weights 0.7,0.3 --name blend")
    p.add_argument("entries", nargs="+", metavar="NAME_OR_ID", help="the adapters to combine (two or more)")
    add_combine_options(p, what="entry")
    p.add_argument("--name", required=True, help="the new entry's display name (unique in the library)")
    p.add_argument("--notes", default="", help="the new entry's notes (default: what it was made of)")
    p.add_argument("--json", action="store_true", help="print the new entry and the combine report as JSON")
    p.set_defaults(func=cmd_combine)


def cmd_combine(args) -> int:
    from core.combine import combine_into_library
    from core.errors import StudioError
    from core.library import Library
    from studio.commands.merge import _parse_weights, check_rank_option

    if len(args.entries) < 2:
        raise StudioError("library combine: give two or more adapters to combine")
    check_rank_option(args)
    library = Library()
    ids = [library.resolve(e).id for e in args.entries]
    weights = _parse_weights(args.weights, len(ids)) or [1.0] * len(ids)
    entry, report = combine_into_library(library, ids, weights, mode=args.combine, rank=args.rank,
                                         name=args.name, notes=args.notes)
    if args.json:
        print(json.dumps({"entry": entry.to_dict(curves=False), "report": report}, indent=2, default=str))
        return 0
    print(f"added '{entry.name}' (id {entry.id}): rank {entry.rank}, {entry.modules} modules, "
          f"{entry.trainable_params:,} parameters; {entry.imported_from}")
    return 0
