"""Playground: one prompt, two answers side by side (the base model and an adapter, or any two).

The model is the session's (core.session: what is on it is read from ``session.view``); each pane
names what answers: "Base model" (no adapter active), one of the adapters on the model, or any
adapter of the library (put on the model under its library id when first used, as the Library's
Apply does, so the adapter just trained is one click away). Both answers are generated one after
the other in one worker by core.library_jobs.generate_answers under a "generate" ticket, streamed
token by token; Stop ends the current answer within one token. Generation switches the active
adapter, so it never runs beside another job on the model: Generate while one holds the model (a
run training, a Library merge) is refused with the session's message naming that job, and a
running generation is stopped when training starts.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                               QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QSplitter, QVBoxLayout, QWidget)

from core.library_jobs import generate_answers  # noqa: F401  (the Playground's job, kept importable here)
from studio import workers
from studio.pages import Page, setting
from studio.pages.playground_pane import BASE, AnswerPane, library_entries  # noqa: F401  (BASE: tests name it)

STOP_REASONS = {"eos": "ended its turn", "length": "reached the token limit", "cancelled": "stopped"}
DEFAULT_PROMPT = "Two large oat milk lattes with an extra shot, please."
"""An order like those of the bundled sample dataset: after the first run on it, the adapter's answer
(the order as JSON) and the base model's (a chat reply) differ at a glance."""


class PlaygroundPage(Page):
    KEY = "playground"
    TITLE = "Playground"
    ICON = "SP_MediaPlay"

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(state, parent)
        self.worker: workers.Worker | None = None
        self.load_worker: workers.Worker | None = None
        self.results: list = []
        self.loaded_adapters = False

        top = QHBoxLayout()
        top.addLayout(self._prompt_column(), 3)
        top.addWidget(self._settings_box(), 1)

        # -- the two answers ----------------------------------------------------------------------
        self.panes = [AnswerPane("A"), AnswerPane("B")]
        split = QSplitter(Qt.Orientation.Horizontal)
        for p in self.panes:
            split.addWidget(p)
        split.setChildrenCollapsible(False)

        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(split, 1)

        state.loaded_changed.connect(self.refresh)
        state.session_changed.connect(self.refresh)
        state.training_changed.connect(self._training_changed)
        state.library_changed.connect(self.refresh)
        state.config_changed.connect(lambda part: part in ("model", "all") and self.refresh())
        self.refresh()

    def _prompt_column(self) -> QVBoxLayout:
        """The prompt, the system message, what the model does with them, and the buttons."""
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Type a prompt…")
        self.prompt.setPlainText(DEFAULT_PROMPT)
        self.prompt.setMaximumHeight(110)
        self.system = QLineEdit()
        self.system.setPlaceholderText("optional system message (chat models only)")
        self.format_label = QLabel()
        self.format_label.setWordWrap(True)

        self.generate_button = QPushButton("Generate")
        self.generate_button.setDefault(True)
        self.generate_button.setToolTip("Generate both answers (Ctrl+G)")
        self.generate_button.setShortcut("Ctrl+G")
        self.generate_button.clicked.connect(self.generate)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load the model chosen on the Model page, to generate with it")
        self.load_button.clicked.connect(self.load_model)
        self.load_bar = QProgressBar()
        self.load_bar.setRange(0, 100)
        self.load_bar.setTextVisible(True)
        self.load_bar.hide()
        self.availability = QLabel()
        self.availability.setWordWrap(True)

        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.load_button)
        buttons.addStretch(1)

        prompt_col = QVBoxLayout()
        prompt_col.addWidget(QLabel("<b>Prompt</b>"))
        prompt_col.addWidget(self.prompt)
        prompt_col.addWidget(self.system)
        prompt_col.addWidget(self.format_label)
        prompt_col.addLayout(buttons)
        prompt_col.addWidget(self.load_bar)
        prompt_col.addWidget(self.availability)
        return prompt_col

    def _settings_box(self) -> QGroupBox:
        """Max new tokens, temperature, top-p, seed, greedy."""
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setValue(128)
        self.max_tokens.setToolTip("The most tokens each answer may have; it usually ends earlier, at its end-of-turn token")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.7)
        self.temperature.setToolTip("Higher is more varied; 0 is greedy")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(0.9)
        self.top_p.setToolTip("Sample only from the most likely tokens whose probabilities add up to this")
        self.greedy = QCheckBox("Greedy (deterministic)")
        self.greedy.setToolTip("Always take the most likely token: the same prompt gives the same answer")
        self.greedy.toggled.connect(self._greedy_toggled)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("Both answers are sampled with this seed, so a difference comes from the adapter")

        box = QGroupBox("Generation")
        form = QFormLayout(box)
        form.addRow("Max new tokens", self.max_tokens)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Seed", self.seed)
        form.addRow("", self.greedy)
        return box

    # -- what can be done now ---------------------------------------------------------------------
    def refresh(self, *_) -> None:
        """Update the choices (the adapters now on the model) and what is enabled, with the reason."""
        loaded = self.state.loaded
        view = self.state.session.view
        adapters: list[str] = []
        merged: list[str] = []
        library = library_entries()
        if view is not None:
            adapters, merged, active = list(view.adapters), list(view.merged), list(view.active)
            # B defaults to the active adapter, else the newest of the library (the one just trained)
            preferred = (active or adapters or [e.id for e in library] or [None])[0]
            self.panes[0].set_choices(adapters, library, None)
            self.panes[1].set_choices(adapters, library, preferred)
            labels = {e.id: e.name for e in library}
            merged = [labels.get(n, n) for n in merged]
        else:
            for p in self.panes:
                p.set_choices([], [], None)
        busy = self.worker is not None
        reason = ""
        if loaded is None:
            reason = "No model is loaded: load the model chosen on the Model page to generate."
        elif self.worker is None and self.state.session.busy_message("generate"):
            reason = self.state.session.busy_message("generate")
        elif not adapters and not library:
            reason = ("No adapter yet: both answers come from the base model. Train one on the Train page "
                      "(or import one in the Library) to compare.")
        if merged:
            reason += (" " if reason else "") + (f"Merged into the weights: {', '.join(merged)}; "
                                                 "“Base model” includes it until you unmerge it in the Library.")
        self.availability.setText(reason)
        loading = self.load_worker is not None
        self.load_button.setVisible(loaded is None)
        self.load_button.setEnabled(not loading)
        self.generate_button.setEnabled(loaded is not None and not busy and not loading)
        self.stop_button.setEnabled(busy)
        for p in self.panes:
            p.choice.setEnabled(not busy)
        tok = loaded.tokenizer if loaded is not None else self.state.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            self.format_label.setText("The prompt is sent as a user turn in the model's chat template.")
            self.system.setEnabled(True)
        elif tok is not None:
            self.format_label.setText("This model has no chat template: the prompt is continued as plain text.")
            self.system.setEnabled(False)
        else:
            self.format_label.setText("")

    def _greedy_toggled(self, on: bool) -> None:
        self.temperature.setEnabled(not on)
        self.top_p.setEnabled(not on)
        self.seed.setEnabled(not on)

    def _training_changed(self, on: bool) -> None:
        if on and self.worker is not None:
            self.stop()  # the trainer needs the model; the current answer ends within one token
        self.refresh()

    # -- loading the model ------------------------------------------------------------------------
    def load_model(self) -> None:
        from core.library_jobs import load_into_session

        if self.load_worker is not None or self.state.loaded is not None:
            return
        ticket = self.state.claim("load", need_model=False)
        if ticket is None:
            return
        m = self.state.config.model
        w = workers.FunctionWorker(load_into_session, ticket, m.source, m.device, m.precision, m.trust_remote_code,
                                   m.quantize)
        self.load_worker = w
        self.load_bar.setValue(0)
        self.load_bar.setFormat("loading the model…")
        self.load_bar.show()
        w.progress.connect(self._load_progress)
        w.failed.connect(self.state.show_error)
        w.done.connect(self._load_done)
        workers.start(w, owner=self, ticket=ticket)
        self.refresh()

    def _load_progress(self, p) -> None:
        message, fraction = p
        self.load_bar.setValue(int(100 * fraction))
        self.load_bar.setFormat(f"{message} (%p%)")

    def _load_done(self) -> None:
        self.load_worker = None
        self.load_bar.hide()
        self.refresh()

    # -- generating -------------------------------------------------------------------------------
    def generation_settings(self) -> dict:
        greedy = self.greedy.isChecked() or self.temperature.value() == 0
        s = {"max_new_tokens": self.max_tokens.value(), "temperature": self.temperature.value(),
             "top_p": self.top_p.value(), "greedy": greedy, "seed": self.seed.value()}
        system = self.system.text().strip()
        if system and self.system.isEnabled():
            s["system"] = system
        return s

    def generate(self) -> None:
        from core.library_jobs import answers_on

        if self.worker is not None:
            return
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            self.state.show_error("The prompt is empty: type something for the model to answer.")
            return
        ticket = self.state.claim("generate", "a Playground generation")
        if ticket is None:  # no model, or another job holds it: the message says which
            return
        choices = [p.selected() for p in self.panes]
        for p in self.panes:
            p.clear()
        self.results = []
        w = workers.FunctionWorker(ticket.run, answers_on, prompt, choices, self.generation_settings())
        self.worker = w
        w.progress.connect(self._on_progress)
        w.finished.connect(self._on_finished)
        w.failed.connect(self._on_failed)
        w.cancelled.connect(self._on_cancelled)
        w.done.connect(self._on_done)
        workers.start(w, owner=self, ticket=ticket)
        self.state.say("generating…")
        self.refresh()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def _on_progress(self, item) -> None:
        kind = item[0]
        if kind == "loaded":
            self.loaded_adapters = True
            return
        i = item[1]
        pane = self.panes[i]
        if kind == "start":
            pane.stats.setText("generating…")
        elif kind == "token":
            pane.append(item[2])
        elif kind == "done":
            g = item[2]
            self.results.append(g)
            n = len(g.token_ids)
            pane.stats.setText(f"{n} token{'s' if n != 1 else ''} · {g.tokens_per_second:.1f} tokens/s · "
                               f"{STOP_REASONS.get(g.stop_reason, g.stop_reason)}")

    def _on_finished(self, results) -> None:
        self.state.say("answers generated")

    def _on_failed(self, message: str) -> None:
        for p in self.panes:
            if p.stats.text() in ("waiting…", "generating…"):
                p.stats.setText("failed")
        self.state.show_error(message)

    def _on_cancelled(self) -> None:
        for p in self.panes:
            if p.stats.text() in ("waiting…", "generating…"):
                p.stats.setText("stopped" if p.stats.text() == "generating…" else "not generated")
        self.state.say("generation stopped")

    def _on_done(self) -> None:
        self.worker = None
        self.loaded_adapters = False  # the session's view, taken when the ticket is back, shows them
        self.refresh()

    # -- window hooks -----------------------------------------------------------------------------
    def page_shown(self) -> None:
        self.refresh()

    def shutdown(self) -> None:
        for w in (self.worker, self.load_worker):
            if w is not None:
                w.cancel()

    def save_settings(self, settings) -> None:
        settings.setValue("prompt", self.prompt.toPlainText())
        settings.setValue("system", self.system.text())
        settings.setValue("max_new_tokens", self.max_tokens.value())
        settings.setValue("temperature", self.temperature.value())
        settings.setValue("top_p", self.top_p.value())
        settings.setValue("seed", self.seed.value())
        settings.setValue("greedy", self.greedy.isChecked())

    def restore_settings(self, settings) -> None:
        self.prompt.setPlainText(setting(settings, "prompt", DEFAULT_PROMPT, str) or DEFAULT_PROMPT)
        self.system.setText(setting(settings, "system", "", str))
        self.max_tokens.setValue(setting(settings, "max_new_tokens", 128, int))
        self.temperature.setValue(setting(settings, "temperature", 0.7, float))
        self.top_p.setValue(setting(settings, "top_p", 0.9, float))
        self.seed.setValue(setting(settings, "seed", 0, int))
        self.greedy.setChecked(setting(settings, "greedy", False, bool))


PAGE = PlaygroundPage
