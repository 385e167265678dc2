"""The jobs the Library and the Playground run on the loaded model, and the library jobs that
read weights: plain functions a worker thread (or a script) calls under a core.session ticket.

Each model job takes the :class:`core.models.LoadedModel` first, so ``ticket.run(fn, ...)`` runs it
on the session's model (see core/session.py for which jobs may overlap). The adapter's name on the
model is its library id.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Compat:
    """Whether a library adapter fits the loaded model: problems refuse it, warnings ask first."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_entries(loaded, items: list[tuple[str, str, dict | None]], *, cancelled=lambda: False) -> dict[str, Compat]:
    """Compatibility of each ``(id, folder, recorded fingerprint)`` with ``loaded`` (its fingerprint
    was taken at load, so what is merged into it since does not count)."""
    from core.library import check_adapter

    out: dict[str, Compat] = {}
    for entry_id, folder, recorded in items:
        if cancelled():
            break
        problems, warnings = check_adapter(folder, loaded, recorded=recorded)
        out[entry_id] = Compat(list(problems), list(warnings))
    return out


def analyse_folder(loaded, folder: str, energy: float = 0.9):
    """core.analysis of the adapter in ``folder``; amplification too when ``loaded`` is given."""
    from core import adapter as adapter_io
    from core import analysis

    return analysis.analyse(adapter_io.read_adapter(folder), model=loaded.model if loaded is not None else None,
                            energy=energy)


def apply_to_model(loaded, folder: str, name: str, action: str, current: str | None = None) -> str:
    """Put library adapter ``folder`` on the model as adapter ``name`` and do ``action`` with it:

    * ``apply``: make it the one active adapter (merged ones stay merged);
    * ``swap``: take ``current`` out and put this one in, merged if ``current`` was (the paper's task
      switch, core.lora.swap_adapter);
    * ``merge``: fold it into the weights.
    """
    from core import adapter as adapter_io
    from core import lora

    model = loaded.model
    if action not in ("apply", "swap", "merge"):
        raise ValueError(action)
    if name not in lora.adapter_names(model):
        adapter_io.load_adapter(model, folder, name=name, activate=False)
    if action == "apply":
        lora.set_active_adapters(model, [name])
    elif action == "swap":
        if current and current != name and current in lora.adapter_names(model):
            lora.swap_adapter(model, current, name)
        else:
            lora.set_active_adapters(model, [name])
    else:
        active = lora.active_adapters(model)
        if name not in active:
            lora.set_active_adapters(model, active + [name])
        lora.merge_adapter(model, name)
    return name


def change_on_model(loaded, name: str, action: str) -> str:
    """``unmerge`` or ``remove`` adapter ``name`` on the model."""
    from core import lora

    if action == "unmerge":
        lora.unmerge_adapter(loaded.model, name)
    elif action == "remove":
        lora.remove_adapter(loaded.model, name)
    else:
        raise ValueError(action)
    return name


def generate_answers(model, tokenizer, prompt: str, choices: list[dict | None], settings: dict, *,
                     progress=lambda item: None, cancelled=lambda: False) -> list:
    """Answer ``prompt`` once per choice, in order, restoring the model's active adapters afterwards.

    A choice is None (the base model) or ``{"name": adapter name on the model, "folder": library
    folder or None}``; an adapter not on the model yet is loaded from its folder first (its shapes
    are checked before the model is touched). Progress items: ``("loaded", name)``, ``("start", i)``,
    ``("token", i, piece)``, ``("done", i, Generation)``.
    """
    from core import adapter as adapter_io
    from core import chat, lora
    from core.generate import generate_with_details

    for choice in choices:
        if choice is not None and choice["name"] not in lora.adapter_names(model):
            adapter_io.load_adapter(model, choice["folder"], name=choice["name"], activate=False)
            progress(("loaded", choice["name"]))
    saved = lora.active_adapters(model)
    results = []
    try:
        for i, choice in enumerate(choices):
            if cancelled():
                break
            lora.set_active_adapters(model, [] if choice is None else [choice["name"]])
            progress(("start", i))
            # an adapter trained on plain text or a chosen template is prompted the way it was trained
            trained = chat.tokenizer_for_adapter(tokenizer, choice["folder"]) if choice and choice.get("folder") else None
            g = generate_with_details(model, trained or tokenizer, prompt, stop=cancelled, as_trained=trained is not None,
                                      on_token=lambda piece, i=i: progress(("token", i, piece)), **settings)
            progress(("done", i, g))
            results.append(g)
    finally:
        lora.set_active_adapters(model, saved)
    return results


def answers_on(loaded, prompt: str, choices: list[dict | None], settings: dict, *, progress, cancelled) -> list:
    """:func:`generate_answers` on a LoadedModel (its model and tokenizer): the Playground's job."""
    return generate_answers(loaded.model, loaded.tokenizer, prompt, choices, settings, progress=progress,
                            cancelled=cancelled)


def combine_into_library(root: str, entry_ids: list[str], weights: list[float], mode: str, rank: int | None,
                         name: str, notes: str):
    """core.combine.combine_into_library on the library at ``root``: (entry, report)."""
    from core import combine
    from core.library import Library

    return combine.combine_into_library(Library(root), entry_ids, weights, mode=mode, rank=rank, name=name,
                                        notes=notes)


def _reporter(progress, cancelled):
    """A ``(message, fraction)`` progress callback for core code that passes each report on as one
    tuple and ends the job with Cancelled at the first report after a cancel."""
    from core.errors import Cancelled

    def report(message: str, fraction: float) -> None:
        if cancelled():
            raise Cancelled()
        progress((message, fraction))

    return report


def export_merged_model(spec_or_loaded, folders: list[str], weights: list[float], mode: str, rank: int | None,
                        out: str, dtype: str | None = None, *, progress=lambda item: None, cancelled=lambda: False):
    """core.export.export_merged (weights saved in ``dtype``: fp32, bf16, fp16 or auto) with
    progress as ``(message, fraction)``; a cancel ends it at the next progress report. It merges into
    a fresh copy of the base, so it only reads the session's model (its spec)."""
    from core import export

    return export.export_merged(spec_or_loaded, folders, weights, combine=mode, rank=rank, out=out,
                                dtype=dtype, progress=_reporter(progress, cancelled))


def load_into_session(ticket, spec: str, device: str, precision: str, trust: bool, quantize: str = "none", *,
                      progress=lambda item: None, cancelled=lambda: False):
    """Load ``spec`` and hand it to the session of ``ticket`` (a "load" ticket the caller takes
    before anything is read, so no other job uses the model meanwhile); progress as ``(message,
    fraction)``; a cancel ends it at the next progress report. Returns the LoadedModel.

    The model the session holds is let go first: a reload then never holds two copies at once (the
    old weights are freed before the new ones are read), at the price of no model when the load
    fails or is cancelled, which the window shows."""
    from core import models

    report = _reporter(progress, cancelled)
    if ticket.session.loaded is not None:
        ticket.session.set_loaded(None, ticket=ticket)
    loaded = models.load_model(spec, device=device, precision=precision, trust_remote_code=trust,
                               quantize=quantize or "none", progress=report)
    ticket.session.set_loaded(loaded, ticket=ticket)
    return loaded


def evaluate_on_session(ticket, model_cfg, source: int, path: str, adapters: list[tuple[str, str]], base: bool,
                        names: list[str], max_new_tokens: int, limit: int | None, batch_size: int, *,
                        progress=lambda item: None, cancelled=lambda: False):
    """The window's evaluation under ``ticket`` (an "evaluate" one): the examples (``source`` 0: a
    file with references, 1: a run folder's validation split), the session's model (reused when it
    is the one ``model_cfg`` asks for, else loaded into the session: core.session.model_for_run),
    every system's answers and scores; the scores are kept with library adapters. ``adapters``:
    (folder, name) pairs; progress as ``(message, done, total)``. Returns the EvalResult."""
    from core import evaluate
    from core.eval_results import store_in_library
    from core.session import model_for_run

    progress(("reading the examples", 0, 1))
    examples = (evaluate.run_examples(path, limit=limit) if source == 1
                else evaluate.read_examples(path, limit=limit))
    systems = evaluate.systems_for([a for a, _ in adapters], base=base, names=[n for _, n in adapters])
    done: dict[str, int] = {}

    def on_progress(system, n, total):
        done[system] = n
        progress((f"answering with {system}: {n} of {total}", sum(done.values()), total * len(systems)))

    def status(_kind, message, fraction):
        progress((message, int(1000 * (fraction or 0)), 1000))

    with model_for_run(ticket, model_cfg, status, merged_means="the base model's answers would be the "
                       "merged adapter's") as loaded:
        result = evaluate.evaluate(loaded, examples, systems, metric_names=names, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=on_progress, cancel=cancelled)
    store_in_library(result, str(path))
    return result
