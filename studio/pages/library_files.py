"""The Library page's actions on files: combine into a new entry, export a merged model, export an
adapter (folder or zip), import, rename, delete to the trash and Undo, and the dialogs they ask
through (replaceable ``ask_*`` hooks, so tests and scripts can answer them).

Each one is a call into core (core.library, core.library_jobs) and has a command-line twin:
``lora-studio library combine|export|import|rename|remove|restore`` and ``lora-studio merge``. An
export merges into its own fresh copy of the base, so it takes a shared ticket from the session:
it runs beside a check or an analysis, never beside a job that changes the model.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QDialog, QFileDialog, QInputDialog, QLineEdit, QMessageBox

from studio import workers
from studio.pages.library_model import _model_name
from studio.widgets import format_bytes
from studio.widgets.combine_dialog import CombineDialog
from studio.widgets.export_dialog import MergedExportDialog


class LibraryFileActions:
    """Mixed into LibraryPage (its table, selection, job bar and undo bar)."""

    # -- library actions --------------------------------------------------------------------------
    def combine_selected(self) -> None:
        entries = self.selected_entries()
        if len(entries) < 2 or self.job is not None:
            return
        values = self.ask_combine(entries, "Combine adapters", True)
        if not values:
            return
        from core.combine import provenance

        name = values["name"] or " + ".join(e.name for e in entries)
        notes = provenance([e.name for e in entries], values["weights"], values["mode"], values["rank"])
        notes = notes[0].upper() + notes[1:]

        def added(result):
            entry, report = result
            self.last_report = report
            self.state.library_changed.emit()
            self.select_ids([entry.id])
            self.state.say(f"{entry.name} added to the library")

        from core.library_jobs import combine_into_library

        self._run_job("Combining", combine_into_library, str(self.library.root), [e.id for e in entries],
                      values["weights"], values["mode"], values["rank"], name, notes, on_done=added,
                      cancellable=False)

    def export_merged_selected(self) -> None:
        entries = self.selected_entries()
        if not entries or self.job is not None:
            return
        values = {"weights": [1.0], "mode": "exact", "rank": None}
        if len(entries) > 1:
            values = self.ask_combine(entries, "Export merged model", False)
            if not values:
                return
        loaded = self.state.loaded
        spec = loaded.spec if loaded is not None else self.state.config.model.source
        base = _model_name(loaded) if loaded is not None else Path(str(spec)).name
        suggestion = str(Path.home() / f"{base}-{'-'.join(e.id for e in entries)[:60]}-merged")
        chosen = self.ask_merged_export(suggestion)
        if not chosen:
            return
        ticket = self.state.claim("export", "exporting a merged model", need_model=False)
        if ticket is None:
            return
        out, dtype = chosen["out"], chosen["dtype"]

        def exported(report):
            self.last_report = report
            size = format_bytes(report.get("size_bytes")) if isinstance(report, dict) else ""
            self.state.say(f"merged model written to {out} ({size}, {report.get('dtype', dtype)}), "
                           "verified by its logits")

        from core.library_jobs import export_merged_model

        self._run_job("Exporting the merged model", export_merged_model, spec, [str(e.path) for e in entries],
                      values["weights"], values["mode"], values["rank"], out, dtype, on_done=exported, ticket=ticket)

    def export_selected(self) -> None:
        entry = self.current_entry()
        if entry is None or self.job is not None:
            return
        chosen = self.ask_save_path(f"Export {entry.name}", str(Path.home() / entry.id), "zip")
        if not chosen:
            return
        dest, as_zip = chosen
        try:
            out = self.library.export(entry.id, dest, zip=as_zip)
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return
        self.state.say(f"{entry.name} exported to {out}")

    def import_dialog(self, folder: bool = True) -> None:
        path = self.ask_import_path(folder)
        if path:
            self.import_path(path)

    def import_path(self, path: str):
        try:
            entry = self.library.import_path(path)
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return None
        self.state.library_changed.emit()
        self.select_ids([entry.id])
        self.state.say(f"{entry.name} imported")
        return entry

    def rename_selected(self) -> None:
        entry = self.current_entry()
        if entry is None:
            return
        new = self.ask_text("Rename adapter", "New name:", entry.name)
        if not new or new.strip() == entry.name:
            return
        try:
            self.library.rename(entry.id, new)
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return
        self.state.library_changed.emit()

    def delete_selected(self) -> None:
        entries = self.selected_entries()
        if not entries or self.job is not None:
            return
        removed = []
        for e in entries:
            try:
                removed.append(self.library.remove(e.id))
            except Exception as ex:  # noqa: BLE001
                self.state.show_error(workers.error_message(ex))
        if not removed:
            return
        self.trashed.append(removed)
        names = ", ".join(e.name for e in removed)
        self.undo_bar.label.setText(f"Moved {names} to the trash.")
        self.undo_bar.show()
        self.state.library_changed.emit()

    def undo_delete(self) -> None:
        if not self.trashed:
            return
        batch = self.trashed.pop()
        restored = []
        for t in batch:
            try:
                restored.append(self.library.restore(t.id))
            except Exception as e:  # noqa: BLE001
                self.state.show_error(workers.error_message(e))
        self.undo_bar.hide()
        self.state.library_changed.emit()
        self.select_ids([e.id for e in restored])

    # -- dialogs (replaceable) --------------------------------------------------------------------
    def _ask_text(self, title: str, label: str, text: str) -> str | None:
        value, ok = QInputDialog.getText(self, title, label, QLineEdit.EchoMode.Normal, text)
        return value if ok else None

    def _ask_confirm(self, title: str, text: str) -> bool:
        return QMessageBox.question(self, title, text) == QMessageBox.StandardButton.Yes

    def _ask_combine(self, entries: list, title: str, with_name: bool) -> dict | None:
        dialog = CombineDialog(entries, title=title, with_name=with_name, parent=self)
        return dialog.values() if dialog.exec() == QDialog.DialogCode.Accepted else None

    def _ask_save_path(self, title: str, suggestion: str, zip_option: str) -> tuple[str, bool] | None:
        """A new path to write; with ``zip_option`` the user may pick a zip instead of a folder."""
        filters = "New folder (*)" if not zip_option else "PEFT adapter folder (*);;Zip archive (*.zip)"
        path, chosen = QFileDialog.getSaveFileName(self, title, suggestion, filters)
        if not path:
            return None
        return path, "zip" in chosen.lower() or path.lower().endswith(".zip")

    def _ask_merged_export(self, suggestion: str) -> dict | None:
        """``{"out": folder, "dtype": "bf16" | "fp16" | "fp32" | "auto"}``, or None when cancelled."""
        info = self.state.model_info
        summary = info.summary if info is not None else {}
        dialog = MergedExportDialog(suggestion, parameters=summary.get("parameters"),
                                    checkpoint_dtype=summary.get("dtype"), parent=self)
        return dialog.values() if dialog.exec() == QDialog.DialogCode.Accepted else None

    def _ask_import_path(self, folder: bool) -> str | None:
        if folder:
            return QFileDialog.getExistingDirectory(self, "Import an adapter folder") or None
        path, _ = QFileDialog.getOpenFileName(self, "Import a zipped adapter", "", "Zip archive (*.zip)")
        return path or None
