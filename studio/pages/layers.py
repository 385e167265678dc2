"""The Layers page: which matrices carry the adapter, and its rank, alpha, dropout and rsLoRA.

The tree (blocks → attention / MLP → matrices, tri-state checkboxes) is built from
``core.targets.list_targets`` on the model's meta-device skeleton (no weights), the preset buttons
and the pattern box go through ``core.targets.resolve_targets``, and the counts are
``core.targets.budget``. All three edit one selection, kept in ``state.config.lora.targets`` as a
preset name when it is exactly a preset, else as the list of qualified names.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QHeaderView,
                               QLabel, QLineEdit, QPushButton, QSpinBox, QTreeWidget, QTreeWidgetItem,
                               QVBoxLayout, QWidget)

from core.config import PRESETS
from studio.pages import Page, setting
from studio.widgets import format_bytes, format_count

GROUP_TEXT = {"attention": "attention", "mlp": "MLP", "other": "other"}
ROLE_TEXT = {"q": "query", "k": "key", "v": "value", "qkv": "query·key·value", "o": "output",
             "gate": "gate", "up": "up", "down": "down", "gate_up": "gate·up", "head": "output head",
             "linear": "linear"}
GUIDANCE = (
    "<b>Choosing r.</b> A small rank (1–8) is enough for tasks close to what the model already "
    "does (a style, a format, a persona); 16–64 for distant ones (a new language, a new skill). "
    "Several matrices with a small r beat one matrix with a large r: adapting all linear layers at "
    "r = 8 usually trains better than the queries and values alone at r = 64."
)
NAME_ROLE = Qt.ItemDataRole.UserRole


class LayersPage(Page):
    KEY = "layers"
    TITLE = "Layers"
    ICON = "SP_FileDialogListView"

    def __init__(self, state, parent=None):
        super().__init__(state, parent)
        self._updating = False
        self.leaves: dict[str, QTreeWidgetItem] = {}
        self.budget = None

        sel_box = self._selection_box()
        shape_box = self._shape_box()
        cost_box = self._cost_box()

        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(shape_box)
        rl.addWidget(cost_box)
        rl.addStretch(1)
        lay = QHBoxLayout(self)
        lay.addWidget(sel_box, 3)
        lay.addWidget(right, 2)

        state.model_info_changed.connect(self._on_info)
        state.config_changed.connect(self._on_config)
        self._sync_shape()
        if state.model_info is not None:
            self._on_info(state.model_info)

    def _selection_box(self) -> QGroupBox:
        """The presets, the pattern box and the tree: one selection."""
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Module", "Shape (out × in)", "Parameters", "LoRA parameters"])
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        hh = self.tree.header()
        hh.setStretchLastSection(False)
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in (1, 2, 3):
            hh.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.itemChanged.connect(self._on_item_changed)

        presets = QHBoxLayout()
        presets.addWidget(QLabel("Presets:"))
        self.preset_buttons: dict[str, QPushButton] = {}
        for p in PRESETS:
            b = QPushButton(p)
            b.setCheckable(True)
            b.setToolTip({"attention-qv": "the query and value matrices (the LoRA paper's default)",
                          "attention": "every attention matrix: q, k, v and the output",
                          "mlp": "the MLP matrices (gate, up, down)",
                          "all-linear": "every linear layer in the blocks (not the output head)"}[p])
            b.clicked.connect(lambda _=False, name=p: self.apply_spec(name))
            self.preset_buttons[p] = b
            presets.addWidget(b)
        presets.addStretch(1)
        self.pattern = QLineEdit()
        self.pattern.setPlaceholderText("q_proj,v_proj or re:REGEX, then Enter")
        self.pattern.setToolTip("Module name suffixes separated by commas (q_proj,v_proj), or a regular "
                                "expression after re: (re:layers\\.(2[0-9])\\..*proj); Enter applies it")
        self.pattern.returnPressed.connect(lambda: self.apply_spec(self.pattern.text().strip()))
        self.pattern_problem = QLabel()
        self.pattern_problem.setWordWrap(True)
        self.pattern_problem.setStyleSheet("color: #D55E00;")
        self.pattern_problem.hide()

        sel_box = QGroupBox("Adapted modules")
        sl = QVBoxLayout(sel_box)
        sl.addLayout(presets)
        sl.addWidget(self.pattern)
        sl.addWidget(self.pattern_problem)
        sl.addWidget(self.tree, 1)
        return sel_box

    def _shape_box(self) -> QGroupBox:
        """Rank, alpha, dropout, rsLoRA, and the guidance on choosing r."""
        self.rank = QSpinBox()
        self.rank.setRange(1, 1024)
        self.alpha = QDoubleSpinBox()
        self.alpha.setRange(0.01, 4096)
        self.alpha.setDecimals(2)
        self.dropout = QDoubleSpinBox()
        self.dropout.setRange(0.0, 0.9)
        self.dropout.setSingleStep(0.05)
        self.dropout.setDecimals(2)
        self.rslora = QCheckBox("rsLoRA (scale by α/√r: steadier at high rank)")
        self.scaling = QLabel()
        for w in (self.rank, self.alpha, self.dropout):
            w.valueChanged.connect(self._on_shape)
        self.rslora.toggled.connect(self._on_shape)
        guidance = QLabel(GUIDANCE)
        guidance.setWordWrap(True)
        guidance.setStyleSheet("color: palette(placeholder-text);")
        shape_box = QGroupBox("Adapter")
        sf = QFormLayout(shape_box)
        sf.addRow("Rank r", self.rank)
        sf.addRow(guidance)
        sf.addRow("Alpha α", self.alpha)
        sf.addRow("Scaling", self.scaling)
        sf.addRow("Dropout", self.dropout)
        sf.addRow(self.rslora)
        return shape_box

    def _cost_box(self) -> QGroupBox:
        """What the selection trains: modules, parameters, share, size on disk."""
        cost_box = QGroupBox("What it costs")
        cf = QFormLayout(cost_box)
        self.modules_label = QLabel("…")
        self.trainable_label = QLabel("…")
        self.share_label = QLabel("…")
        self.size_label = QLabel("…")
        f = self.trainable_label.font()
        f.setBold(True)
        self.trainable_label.setFont(f)
        cf.addRow("Modules", self.modules_label)
        cf.addRow("Trainable parameters", self.trainable_label)
        cf.addRow("Share of the model", self.share_label)
        cf.addRow("Adapter on disk", self.size_label)
        return cost_box

    # -- building the tree ------------------------------------------------------------------------
    def _on_info(self, info) -> None:
        self._updating = True
        self.tree.clear()
        self.leaves.clear()
        if info is None:
            self._updating = False
            self.tree.addTopLevelItem(QTreeWidgetItem(["reading the model…"]))
            self._show_budget(None)
            return
        from core.targets import group_by_block

        checkable = Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled
        tristate = checkable | Qt.ItemFlag.ItemIsAutoTristate
        for block, groups in group_by_block(info.targets).items():
            count = sum(len(m) for m in groups.values())
            params = sum(t.params for m in groups.values() for t in m)
            b_item = QTreeWidgetItem([block or "outside the blocks", "", format_count(params), ""])
            b_item.setFlags(tristate)
            b_item.setCheckState(0, Qt.CheckState.Unchecked)
            b_item.setToolTip(0, f"{count} adaptable modules")
            for col in (2, 3):
                b_item.setTextAlignment(col, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.tree.addTopLevelItem(b_item)
            for group, mods in groups.items():
                g_item = QTreeWidgetItem([GROUP_TEXT.get(group, group), "",
                                          format_count(sum(t.params for t in mods)), ""])
                g_item.setFlags(tristate)
                g_item.setCheckState(0, Qt.CheckState.Unchecked)
                for col in (2, 3):
                    g_item.setTextAlignment(col, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                b_item.addChild(g_item)
                for t in mods:
                    leaf = t.name.split(".")[-1]
                    item = QTreeWidgetItem([f"{leaf}  ({ROLE_TEXT.get(t.role, t.role)})",
                                            f"{t.d_out} × {t.d_in}", f"{t.params:,}", ""])
                    item.setFlags(checkable | Qt.ItemFlag.ItemNeverHasChildren)
                    item.setCheckState(0, Qt.CheckState.Unchecked)
                    item.setData(0, NAME_ROLE, t.name)
                    item.setToolTip(0, f"{t.name} ({t.kind})")
                    for col in (2, 3):
                        item.setTextAlignment(col, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    g_item.addChild(item)
                    self.leaves[t.name] = item
        self._updating = False
        if self.tree.topLevelItemCount() <= 3:
            self.tree.expandToDepth(1)
        else:
            self.tree.topLevelItem(0).setExpanded(True)
        spec = self.state.config.lora.targets
        try:
            self.apply_spec(spec, quiet=True)
        except Exception:  # noqa: BLE001 - a selection from another model: fall back to the default
            self.apply_spec("all-linear")

    # -- one selection, three editors -------------------------------------------------------------
    def apply_spec(self, spec, *, quiet: bool = False) -> bool:
        """Select what ``spec`` (a preset, suffixes, full names or a regex) picks; True if it did."""
        info = self.state.model_info
        if isinstance(spec, str) and not spec:
            return False
        if info is None:
            self.state.config.lora.targets = spec
            self.state.changed("lora")
            return True
        from core.errors import StudioError
        from core.targets import resolve_targets

        try:
            names = set(resolve_targets(info.targets, spec))
        except StudioError as e:
            from studio.messages import for_window

            self.pattern_problem.setText(for_window(e))
            self.pattern_problem.show()
            if quiet:
                raise
            return False
        self.pattern_problem.hide()
        self._updating = True
        for name, item in self.leaves.items():
            item.setCheckState(0, Qt.CheckState.Checked if name in names else Qt.CheckState.Unchecked)
        self._updating = False
        self._selection_changed(spec_hint=spec)
        return True

    def selected(self) -> list[str]:
        """Qualified names of the checked matrices, in model order."""
        return [n for n, item in self.leaves.items() if item.checkState(0) == Qt.CheckState.Checked]

    def _on_item_changed(self, item, column) -> None:
        if self._updating or column != 0:
            return
        self._selection_changed()

    def _selection_changed(self, spec_hint=None) -> None:
        info = self.state.model_info
        names = self.selected()
        from core.targets import resolve_targets

        spec: str | list[str] = names
        for p in PRESETS:  # store a preset by its name: it transfers to other models and reads well
            try:
                if set(resolve_targets(info.targets, p)) == set(names):
                    spec = p
                    break
            except Exception:  # noqa: BLE001 - a preset this model has no modules for
                continue
        if spec == names and isinstance(spec_hint, str) and spec_hint not in PRESETS:
            spec = spec_hint  # the user's pattern, kept as typed
        for p, b in self.preset_buttons.items():
            b.setChecked(spec == p)
        if isinstance(spec, str):
            if self.pattern.text() != spec:
                self.pattern.setText(spec)
        elif spec_hint is None:
            self.pattern.clear()
        self.state.config.lora.targets = spec if names else []
        self._show_budget(names)
        self.state.changed("lora")

    # -- rank, alpha, dropout ---------------------------------------------------------------------
    def _sync_shape(self) -> None:
        lo = self.state.config.lora
        for w, v in ((self.rank, lo.rank), (self.alpha, lo.alpha), (self.dropout, lo.dropout)):
            w.blockSignals(True)
            w.setValue(v)
            w.blockSignals(False)
        self.rslora.blockSignals(True)
        self.rslora.setChecked(lo.rslora)
        self.rslora.blockSignals(False)
        self._show_scaling()

    def _show_scaling(self) -> None:
        lo = self.state.config.lora
        formula = "α/√r" if lo.rslora else "α/r"
        self.scaling.setText(f"{formula} = {lo.scaling:.3g}")

    def _on_shape(self, *_):
        lo = self.state.config.lora
        lo.rank = self.rank.value()
        lo.alpha = float(self.alpha.value())
        lo.dropout = float(self.dropout.value())
        lo.rslora = self.rslora.isChecked()
        self._show_scaling()
        self._show_budget(self.selected() if self.leaves else None)
        self.state.changed("lora")

    def _on_config(self, part: str) -> None:
        if part == "all":
            self._sync_shape()
            if self.state.model_info is not None:
                try:
                    self.apply_spec(self.state.config.lora.targets, quiet=True)
                except Exception:  # noqa: BLE001
                    pass

    def _show_budget(self, names) -> None:
        info = self.state.model_info
        if info is None or names is None:
            for lab in (self.modules_label, self.trainable_label, self.share_label, self.size_label):
                lab.setText("…")
            self.budget = None
            return
        from core.targets import budget

        r = self.state.config.lora.rank
        b = budget(info.meta, names, r)
        self.budget = b
        by_name = {t.name: t for t in info.targets}
        chosen = set(names)
        for name, item in self.leaves.items():
            item.setText(3, f"{by_name[name].lora_params(r):,}" if name in chosen else "")
        # Blocks and groups show their share, so a collapsed tree still says where the adapter sits.
        for i in range(self.tree.topLevelItemCount()):
            block = self.tree.topLevelItem(i)
            block_sum = 0
            for j in range(block.childCount()):
                group = block.child(j)
                n = sum(by_name[group.child(k).data(0, NAME_ROLE)].lora_params(r)
                        for k in range(group.childCount()) if group.child(k).data(0, NAME_ROLE) in chosen)
                group.setText(3, format_count(n) if n else "")
                block_sum += n
            block.setText(3, format_count(block_sum) if block_sum else "")
        self.modules_label.setText(f"{b.modules} of {len(self.leaves)} matrices")
        self.trainable_label.setText(f"{b.trainable:,} ({format_count(b.trainable)})")
        self.share_label.setText(f"{100 * b.share:.3f} % of {format_count(b.total)}")
        self.size_label.setText(f"{format_bytes(b.adapter_bytes)} (fp32 safetensors)")

    # -- settings ---------------------------------------------------------------------------------
    def save_settings(self, s) -> None:
        lo = self.state.config.lora
        import json

        s.setValue("targets", json.dumps(lo.targets))
        s.setValue("rank", lo.rank)
        s.setValue("alpha", lo.alpha)
        s.setValue("dropout", lo.dropout)
        s.setValue("rslora", lo.rslora)

    def restore_settings(self, s) -> None:
        import json

        lo = self.state.config.lora
        try:
            t = json.loads(setting(s, "targets", json.dumps(lo.targets), str))
            if isinstance(t, (str, list)) and t:
                lo.targets = t
        except ValueError:
            pass
        lo.rank = max(1, setting(s, "rank", lo.rank, int))
        lo.alpha = setting(s, "alpha", lo.alpha, float)
        lo.dropout = min(0.9, max(0.0, setting(s, "dropout", lo.dropout, float)))
        lo.rslora = setting(s, "rslora", lo.rslora, bool)
        self._sync_shape()


PAGE = LayersPage
