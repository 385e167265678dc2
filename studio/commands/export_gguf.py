"""``lora-studio export-gguf``: the merged model (or the adapter alone) as a GGUF file for llama.cpp,
Ollama and LM Studio, with an Ollama Modelfile, each checked before it is moved into place."""

from __future__ import annotations

import json
import sys

from core.errors import StudioError

TYPES_HELP = ("f16, bf16, q8_0 (about 1.06 bytes a weight: near-lossless), q5_1, q5_0, q4_1, q4_0; and, with "
              "llama-cpp-python installed (pip install 'lora-studio[gguf-k]'), the K-quants q6_k, q5_k_m, "
              "q4_k_m, q3_k_m, q2_k")


def register(sub) -> None:
    from studio.commands import add_model_option, add_quantize_option

    m = sub.add_parser(
        "export-gguf", help="write a GGUF file for llama.cpp / Ollama (merged model or adapter alone) and a Modelfile",
        description="Merge the adapter(s) into the base model (or take the adapter alone with --adapter-only) and "
                    "write DIR/<name>.gguf and DIR/Modelfile for Ollama. Before anything is moved into place the "
                    "file is read back and compared with the merged model in transformers on fixed prompts (F16/BF16 "
                    "logits within 1e-2, Q8_0 the same greedy continuation, Q4/Q5 the same top-1 token on 95%% of "
                    "positions) and its tokenizer with the model's; a failure prints the figures and writes nothing.")
    add_model_option(m)
    m.add_argument("--adapter", action="append", default=[], metavar="A",
                   help="an adapter folder or the name or id of one in the library; repeat to merge several "
                        "(none: the base model alone)")
    m.add_argument("--weights", metavar="W1,W2,...", help="one weight per adapter (default: 1 each)")
    m.add_argument("--combine", default="exact", choices=("exact", "svd", "ties", "dare_linear", "dare_ties"),
                   help="how several adapters are combined before merging (as 'merge --combine'; default exact)")
    m.add_argument("--rank", type=int, metavar="R", help="rank of the combined adapter for svd, ties, dare_*")
    m.add_argument("--adapter-only", action="store_true",
                   help="write the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER) instead of a "
                        "merged model; it applies to the base model's own GGUF")
    m.add_argument("--type", dest="type_name", default="q8_0", metavar="T", help=f"{TYPES_HELP} (default: q8_0)")
    m.add_argument("--out", required=True, metavar="DIR",
                   help="the folder to write into (created if needed); <name>.gguf and Modelfile must not exist there")
    m.add_argument("--name", help="the file's name (default: the model's and the adapters' names and the type)")
    m.add_argument("--system", metavar="TEXT", help="the system prompt for the Modelfile's SYSTEM")
    m.add_argument("--temperature", type=float, help="PARAMETER temperature in the Modelfile")
    m.add_argument("--top-p", dest="top_p", type=float, help="PARAMETER top_p in the Modelfile")
    m.add_argument("--ollama-create", metavar="NAME",
                   help="then run 'ollama create NAME -f DIR/Modelfile' and print its output (needs ollama on the PATH)")
    add_quantize_option(m, prefix="the base the adapters were trained on (QLoRA): ")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    m.set_defaults(func=cmd_export_gguf)


def _summary(report: dict) -> str:
    v = report.get("verify") or {}
    if "relative" in v and "prompts_same" not in v:
        check = f"logits within {v['relative']:.2e} relative of the merged model (tolerance {v.get('tolerance', 1e-2):g})"
    elif "prompts_same" in v:
        check = (f"the same {v['greedy_tokens']}-token greedy continuation on {v['prompts_same']} of {v['prompts']} "
                 f"prompts ({v['near_ties_excused']} near-tie steps)")
    else:
        check = f"the same top-1 token on {100 * v.get('top1_agreement', 0):.1f}% of {v.get('positions')} positions"
    tok = v.get("tokenizer")
    if tok:
        check += f"; tokenizer ({tok['model']}, pre '{tok['pre']}') gives the same {tok['ids']} ids"
    return check


def cmd_export_gguf(args) -> int:
    from tqdm import tqdm

    from core import gguf_export, ollama
    from studio.commands.merge import _parse_weights, adapter_folder

    gguf_export.check_type(args.type_name)
    if args.adapter_only and not args.adapter:
        raise StudioError("--adapter-only: give the adapter with --adapter")
    if args.ollama_create and not ollama.ollama_available():
        raise StudioError("--ollama-create: the 'ollama' command is not on the PATH",
                          hint="install Ollama from https://ollama.com, or leave out --ollama-create")
    folders = [adapter_folder(a) for a in args.adapter]
    weights = _parse_weights(args.weights, len(folders))
    sampling = {k: getattr(args, k) for k in ("temperature", "top_p") if getattr(args, k) is not None}
    bar = tqdm(total=100, unit="%", disable=None, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}")

    def progress(message: str, fraction: float) -> None:
        bar.set_description_str(message[:60])
        bar.update(int(round(100 * fraction)) - bar.n)

    try:
        report = gguf_export.export_gguf(args.model, folders, weights, type_name=args.type_name, out=args.out,
                                         combine=args.combine, rank=args.rank, adapter_only=args.adapter_only,
                                         name=args.name, system=args.system, sampling=sampling,
                                         quantize=args.quantize, progress=progress)
    finally:
        bar.close()
    if args.ollama_create:
        report["ollama_create"] = ollama.create(args.ollama_create, report["modelfile"])
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"wrote {report['out']} ({report['size_bytes'] / 2**20:.1f} MiB, {report['type'].upper()}) and "
          f"{report['modelfile']} in {report['seconds']['total']:.1f} s")
    print(f"verified: {_summary(report)}")
    if args.ollama_create:
        print(report["ollama_create"])
    elif ollama.ollama_available():
        print(f"to use it in Ollama: ollama create NAME -f {report['modelfile']}")
    return 0
