"""The Data page with a dataset on the Hub (issue 14): typing ``org/name`` brings out the Split and
Configuration fields, they reach the RunConfig, and the page reads what they name, against the small
Hub on 127.0.0.1 of tests/hub_server.py (no test here touches the internet).

``datasets`` and ``huggingface_hub`` read the Hub's address once, at import; in this process they
may have been imported already, so the fixture points their module constants at the test server
too (monkeypatch puts everything back).
"""

from __future__ import annotations

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)
from conftest import tiny_tokenizer
from hub_server import HubRepo
from test_hub import _parquet, server  # noqa: F401  (the server fixture)

LONG = 60_000  # ms

ROWS = [{"instruction": f"Add {i} and {i}.", "output": str(2 * i)} for i in range(30)]
README = """---
configs:
- config_name: easy
  data_files:
  - split: train
    path: easy/train.parquet
  - split: test
    path: easy/test.parquet
- config_name: chat
  data_files:
  - split: train
    path: chat/train.parquet
---
# sums
"""


@pytest.fixture
def hub(server, tmp_path, monkeypatch):  # noqa: F811  (the fixture imported above)
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", server.url)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL", server.url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    chat = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
            for i in range(5)]
    server.add(HubRepo("acme/sums", {"README.md": README.encode(), "easy/train.parquet": _parquet(ROWS),
                                     "easy/test.parquet": _parquet(ROWS[:7]), "chat/train.parquet": _parquet(chat)},
                       repo_type="dataset"))
    return server


@pytest.fixture
def page(qtbot):
    from studio.pages.data import DataPage
    from studio.state import StudioState

    state = StudioState()
    state.tokenizer = tiny_tokenizer()
    p = DataPage(state)
    qtbot.addWidget(p)
    p.show()
    errors: list[str] = []
    state.error.connect(errors.append)
    p.errors = errors
    yield p
    p.shutdown()


def _type(field, text: str) -> None:
    field.setText(text)
    field.editingFinished.emit()  # what leaving the field (or Return) does


def _read(qtbot, page, count: int) -> None:
    qtbot.waitUntil(lambda: page._inspect_worker is None and page.inspected is not None
                    and page.inspected["count"] == count, timeout=LONG)


def test_hub_split_and_configuration_fields_reach_the_config_and_the_reading(hub, page, qtbot, tmp_path):
    d = page.state.config.data
    assert not page.source.hub_row.isVisibleTo(page)  # the bundled sample: a file
    _type(page.path, "acme/sums")
    assert page.source.hub_row.isVisibleTo(page) and d.path == "acme/sums"
    _type(page.source.subset, "easy")
    assert (d.split, d.subset) == ("", "easy")
    _read(qtbot, page, 30)  # no split named: 'train'
    assert page.inspected["format"] == "instruction"
    assert any("acme/sums, easy, split 'train'" in n for n in page.inspected["notes"])
    _type(page.source.split, "test")
    assert d.split == "test"
    _read(qtbot, page, 7)
    qtbot.waitUntil(lambda: page.prepared is not None and page.prepared["train"] == 7, timeout=LONG)
    assert page.table_model.rowCount() == 7 and page.example_info.text().startswith("First example:")

    _type(page.source.split, "validation")  # no such split: one line in the window's words
    qtbot.waitUntil(lambda: page.inspected is None and bool(page.errors), timeout=LONG)
    assert "validation" in page.errors[-1] and "--" not in page.errors[-1], page.errors[-1]
    _type(page.source.split, "")
    _type(page.source.subset, "chat")
    _read(qtbot, page, 5)
    assert page.inspected["format"] == "chat"

    local = tmp_path / "local.jsonl"
    local.write_text('{"text": "hello"}\n{"text": "there"}\n', encoding="utf-8")
    _type(page.path, str(local))  # a file again: the Hub fields go, and so do their values
    assert not page.source.hub_row.isVisibleTo(page) and (d.split, d.subset) == ("", "")
    _read(qtbot, page, 2)


def test_hub_fields_are_saved_with_the_page_settings(page, tmp_path):
    from PySide6.QtCore import QSettings

    from studio.pages.data import DataPage

    d = page.state.config.data
    d.path, d.split, d.subset = "acme/sums", "test", "easy"
    s = QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat)
    page.save_settings(s)
    from studio.state import StudioState

    again = DataPage(StudioState())
    again.restore_settings(s)
    d2 = again.state.config.data
    assert (d2.path, d2.split, d2.subset) == ("acme/sums", "test", "easy")
    assert again.source.split.text() == "test" and again.source.subset.text() == "easy"
    assert again.source.hub_row.isVisibleTo(again)
    again.deleteLater()
