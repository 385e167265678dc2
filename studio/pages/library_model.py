"""The Library page's model side: what is on the loaded model, whether each adapter fits it, the
actions on it (apply, swap, merge, unmerge, remove, load) and the one job bar they run under.

Every job here takes a ticket from the session that owns the model (``state.claim``, see
core/session.py) before it starts: a job another one keeps from starting (training, a Playground
generation, a merge) is refused with the session's message naming that job; background reads (the
compatibility check, the ΔW analysis) are skipped quietly and tried again when the model is free.
The jobs themselves are core.library_jobs functions, run by ``ticket.run`` in a worker.
"""

from __future__ import annotations

from pathlib import Path

from studio import workers

VERBS = {"apply": "Applying", "swap": "Swapping to", "merge": "Merging", "unmerge": "Unmerging",
         "remove": "Removing"}


class LibraryModelSide:
    """Mixed into LibraryPage (which builds the widgets these methods use)."""

    # -- the loaded model -------------------------------------------------------------------------
    def _loaded_changed(self, loaded) -> None:
        self.analysis_cache = {k: v for k, v in self.analysis_cache.items() if not k[1]}
        self._refresh_model_side()
        self._start_checks()

    def _session_changed(self) -> None:
        """A job took or gave back the model: what is on it, and a check that waited for it."""
        self._refresh_model_side()
        if self.checks_pending and not self.state.session.holders():
            self._start_checks()

    def _refresh_model_side(self) -> None:
        """The line about the loaded model and the "On the model" column, from the session's view."""
        view = self.state.session.view
        on: dict[str, str] = {}
        if view is None:
            self.model_line.setText("No model is loaded: load it to apply, swap and merge adapters.")
        else:
            on = {n: view.state_of(n) for n in view.adapters}
            shown = ", ".join(f"{self._display_name(n)} ({on[n]})" for n in view.adapters) or "no adapter"
            self.model_line.setText(f"Loaded: {_model_name(self.state.loaded)} on {view.device} · {shown}")
        self.load_button.setVisible(view is None)
        self.model.set_on_model(on)
        self._update_actions()

    def _display_name(self, adapter_name: str) -> str:
        row = self.model.row_of(adapter_name)
        return self.model.entries[row].name if row >= 0 else adapter_name

    def _start_checks(self) -> None:
        """Check the entries against the loaded model, in a worker; rows grey out as results come.

        Results are kept per model and adapter file: whether an adapter fits the base model does not
        change when adapters are applied or merged, so only new entries and a newly loaded model are
        checked (and a check made after a merge does not mistake the merge for other weights)."""
        from core import library_jobs

        if self.check_worker is not None:
            self.check_worker.cancel()
            self.check_worker = None
        self.checks_pending = False
        loaded = self.state.loaded
        if loaded is None or not self.model.entries:
            self.model.set_compat({})
            self._update_actions()
            return
        key = id(loaded)
        known = {e.id: self.compat_cache[(key, e.id, e.adapter_hash)] for e in self.model.entries
                 if (key, e.id, e.adapter_hash) in self.compat_cache}
        self.model.set_compat(known)
        todo = [e for e in self.model.entries if e.id not in known]
        ticket = self.state.claim("check", quiet=True) if todo else None
        if ticket is None:
            self.checks_pending = bool(todo)  # the model is busy: check when it is free
            self._update_actions()
            return
        hashes = {e.id: e.adapter_hash for e in todo}
        w = workers.FunctionWorker(ticket.run, library_jobs.check_entries,
                                   [(e.id, str(e.path), e.base_fingerprint) for e in todo])
        self.check_worker = w

        def done(result, w=w):
            for entry_id, compat in result.items():
                self.compat_cache[(key, entry_id, hashes[entry_id])] = compat
            if w is self.check_worker:
                self.model.set_compat({**self.model.compat, **result})
                entry = self.current_entry()
                if entry is not None:
                    self.details.show_compat(True, self.model.compat.get(entry.id))
                    self._maybe_analyse()
                self._update_actions()

        def finish(w=w):
            if w is self.check_worker:
                self.check_worker = None
                self._update_actions()

        w.finished.connect(done)
        w.failed.connect(self.state.show_error)
        w.done.connect(finish)
        workers.start(w, owner=self, ticket=ticket)

    def load_model(self) -> None:
        from core import library_jobs

        if self.state.loaded is not None or self.job is not None:
            return
        ticket = self.state.claim("load", need_model=False)
        if ticket is None:
            return
        m = self.state.config.model
        self._run_job("Loading the model", library_jobs.load_into_session, ticket, m.source, m.device, m.precision,
                      m.trust_remote_code, m.quantize, cancellable=False, ticket=ticket)

    # -- ΔW analysis ------------------------------------------------------------------------------
    def _maybe_analyse(self) -> None:
        """Analyse the current adapter when the ΔW tab is visible (cached per adapter and model):
        with the model (amplification) when it fits and the model is free, else the adapter alone."""
        from core import library_jobs

        entry = self.current_entry()
        if entry is None or self.tabs.currentWidget() is not self.delta:
            return
        c = self.model.compat.get(entry.id)
        ticket = None
        if self.state.loaded is not None and c is not None and c.ok:
            ticket = self.state.claim("analyse", quiet=True)
        key = (entry.id, ticket is not None)
        if key in self.analysis_cache:
            if ticket is not None:
                ticket.release()
            self.delta.set_analysis(self.analysis_cache[key])
            return
        if self.analysis_worker is not None:
            self.analysis_worker.cancel()
        self.delta.set_message("Computing the singular values of every ΔW…")
        if ticket is not None:
            w = workers.FunctionWorker(ticket.run, library_jobs.analyse_folder, str(entry.path))
        else:
            w = workers.FunctionWorker(library_jobs.analyse_folder, None, str(entry.path))
        self.analysis_worker = w

        def done(result, w=w, key=key):
            self.analysis_cache[key] = result
            if w is self.analysis_worker and self.current_id == key[0]:
                self.delta.set_analysis(result)

        def failed(message, w=w):
            if w is self.analysis_worker:
                self.delta.set_message(f"The analysis failed: {message}")

        def finish(w=w):
            if w is self.analysis_worker:
                self.analysis_worker = None
                self._update_actions()

        w.finished.connect(done)
        w.failed.connect(failed)
        w.done.connect(finish)
        workers.start(w, owner=self, ticket=ticket)
        self._update_actions()

    # -- what can be done now ---------------------------------------------------------------------
    def _update_actions(self) -> None:
        selected = self.selected_entries()
        one = selected[0] if len(selected) == 1 else None
        loaded = self.state.loaded
        idle = self.job is None
        # a check or an analysis reads the weights a merge would change under it: wait for them
        model_free = loaded is not None and idle and self.check_worker is None and self.analysis_worker is None
        compat = self.model.compat.get(one.id) if one is not None else None
        fits = compat is not None and compat.ok
        on = self.model.on_model.get(one.id) if one is not None else None
        active_other = [n for n, s in self.model.on_model.items() if s in ("active", "merged") and
                        (one is None or n != one.id)]
        reason = ""
        if loaded is None:
            reason = "Load a model first"
        elif one is None:
            reason = "Select one adapter"
        elif compat is None:
            reason = "Checking whether it fits the loaded model…"
        elif compat.problems:
            reason = "Does not fit the loaded model: " + compat.problems[0]
        for b, ok, tip in (
                (self.apply_button, model_free and fits and on != "active",
                 "Put this adapter on the loaded model and make it the active one"),
                (self.swap_button, model_free and fits and bool(active_other) and on not in ("active", "merged"),
                 "Replace the active adapter with this one, merged if it was"),
                (self.merge_button, model_free and fits and on != "merged", "Fold this adapter into the weights"),
                (self.unmerge_button, model_free and on == "merged", "Take this adapter back out of the weights"),
                (self.detach_button, model_free and on is not None, "Take this adapter off the loaded model")):
            b.setEnabled(bool(ok))
            b.setToolTip(tip if ok or not reason else f"{tip}\n({reason})")
        self.combine_button.setEnabled(idle and len(selected) >= 2)
        self.export_merged_button.setEnabled(idle and len(selected) >= 1)
        self.export_gguf_button.setEnabled(idle and len(selected) >= 1)
        self.export_button.setEnabled(idle and one is not None)
        self.rename_button.setEnabled(idle and one is not None)
        self.delete_button.setEnabled(idle and bool(selected) and not (
            self.state.training and any(self.model.on_model.get(e.id) for e in selected)))
        self.import_button.setEnabled(idle)
        self.load_button.setEnabled(idle)

    # -- the job bar ------------------------------------------------------------------------------
    def _run_job(self, label: str, fn, *args, on_done=None, cancellable: bool = True, ticket=None,
                 **kwargs) -> workers.Worker:
        """Run one job at a time with a progress bar (and Cancel when the job can stop); ``ticket``
        (the session's, for a job on the model) is given back when the job's thread ends."""
        w = workers.FunctionWorker(fn, *args, **kwargs)
        self.job, self.job_name = w, label
        self.job_bar.setRange(0, 0)  # busy until the job reports a fraction
        self.job_bar.setFormat(label + "…")
        self.job_bar.setTextVisible(True)
        self.job_cancel.setVisible(cancellable)
        self.job_cancel.setEnabled(True)
        self.job_row.show()

        def progress(p):
            if isinstance(p, tuple) and len(p) == 2:
                message, fraction = p
                self.job_bar.setRange(0, 1000)
                self.job_bar.setValue(int(1000 * max(0.0, min(1.0, float(fraction)))))
                self.job_bar.setFormat(f"{label}: {message} (%p%)")

        def done():
            self.job = None
            self.job_row.hide()
            self._update_actions()

        if on_done is not None:
            w.finished.connect(on_done)
        w.progress.connect(progress)
        w.failed.connect(self.state.show_error)
        w.cancelled.connect(lambda: self.state.say(f"{label.lower()}: cancelled"))
        w.done.connect(done)
        workers.start(w, owner=self, ticket=ticket)
        self._update_actions()
        return w

    def cancel_job(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job_cancel.setEnabled(False)
            self.job_bar.setFormat(f"{self.job_name}: cancelling…")

    # -- actions on the model ---------------------------------------------------------------------
    def _model_action(self, action: str) -> None:
        from core import library_jobs

        entry = self.current_entry()
        if entry is None or self.state.loaded is None or self.job is not None:
            return
        compat = self.model.compat.get(entry.id)
        if action in ("apply", "swap", "merge"):
            if compat is None or compat.problems:
                self.state.show_error(f"{entry.name} cannot be applied to the loaded model: "
                                      + ("; ".join(compat.problems) if compat else "it has not been checked yet"))
                return
            if compat.warnings and not self.ask_confirm(
                    "The base model differs", "\n\n".join(compat.warnings) + "\n\nApply it anyway?"):
                return
        label = f"{VERBS[action]} {entry.name}"
        ticket = self.state.claim(action, label.lower())
        if ticket is None:
            return
        if action in ("unmerge", "remove"):
            args = (library_jobs.change_on_model, entry.id, action)
        else:
            current = next((n for n, s in self.model.on_model.items()
                            if s in ("active", "merged") and n != entry.id), None)
            args = (library_jobs.apply_to_model, str(entry.path), entry.id, action, current)
        self._run_job(label, ticket.run, *args, on_done=lambda _: self._model_changed(f"{entry.name}: {action} done"),
                      cancellable=False, ticket=ticket)

    def apply_selected(self) -> None:
        self._model_action("apply")

    def swap_selected(self) -> None:
        self._model_action("swap")

    def merge_selected(self) -> None:
        self._model_action("merge")

    def unmerge_selected(self) -> None:
        self._model_action("unmerge")

    def detach_selected(self) -> None:
        self._model_action("remove")

    def _model_changed(self, message: str) -> None:
        self.state.say(message)
        self.analysis_cache = {k: v for k, v in self.analysis_cache.items() if not k[1]}
        self.state.session.refresh_view()  # the Playground and this page show what is on it now
        entry = self.current_entry()
        if entry is not None:
            self._show_entry(entry)


def _model_name(loaded) -> str:
    ref = getattr(loaded, "ref", None)
    if ref is not None and getattr(ref, "name", None):
        return ref.name
    spec = str(getattr(loaded, "spec", "") or "")
    return "SmolLM2-135M-Instruct" if spec == "default" else (Path(spec).name or spec)
