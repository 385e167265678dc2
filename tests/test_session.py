"""core.session: one owner of the loaded model. A generation, a swap and a merge started at once
from three threads give the outputs of the same jobs run one after another; a job that cannot
start is refused with a message naming the job that holds the model; readers share, writers wait
their turn in order. Tiny checkpoint, CPU, no Qt."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from conftest import TOKENIZER_VOCAB, token_batch
from core import adapter as adapter_io
from core import library_jobs, lora, models
from core.session import ModelBusy, ModelSession, NoModel

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
SETTINGS = {"max_new_tokens": 12, "greedy": True, "seed": 0}


def _adapter(folder, model, seed: int):
    lora.inject_adapter(model, TARGETS, "tmp", rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            if "tmp" in layer.lora_B:
                layer.lora_B["tmp"].copy_(torch.randn(layer.lora_B["tmp"].shape, generator=g))
    adapter_io.save_adapter(model, folder, "tmp", base_model="tiny")
    lora.remove_adapter(model, "tmp")
    return str(folder)


@pytest.fixture
def folders(tmp_path, checkpoint):
    loaded = models.load_model(str(checkpoint), device="cpu")
    return {"a": _adapter(tmp_path / "a", loaded.model, 1), "b": _adapter(tmp_path / "b", loaded.model, 2)}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(vocab=TOKENIZER_VOCAB)).logits


def _jobs(folders):
    """name -> (session job, what it does to the loaded model; its output)."""
    def generate(loaded):
        answers = library_jobs.generate_answers(loaded.model, loaded.tokenizer, "Add 1 and 2.",
                                                [None, {"name": "a", "folder": folders["a"]}], SETTINGS)
        return [g.token_ids for g in answers]

    def swap(loaded):
        library_jobs.apply_to_model(loaded, folders["b"], "b", "swap", "a")
        return _logits(loaded.model)

    def merge(loaded):
        library_jobs.apply_to_model(loaded, folders["b"], "b", "merge")
        return _logits(loaded.model)

    return {"generate": generate, "swap": swap, "merge": merge}


def _fresh(checkpoint, folders) -> ModelSession:
    session = ModelSession(models.load_model(str(checkpoint), device="cpu"))
    with session.job("apply") as loaded:
        library_jobs.apply_to_model(loaded, folders["a"], "a", "apply")
    return session


def test_generate_swap_and_merge_at_once_equal_the_same_jobs_one_after_another(checkpoint, folders):
    jobs = _jobs(folders)
    session = _fresh(checkpoint, folders)
    outputs: dict[str, object] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(jobs))
    inside = []  # how many jobs were inside the model at once, seen from each job

    def run(name):
        try:
            go.wait()
            with session.job(name) as loaded:
                inside.append(sum(1 for t in session.holders()))
                outputs[name] = jobs[name](loaded)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and set(outputs) == set(jobs)
    assert inside == [1, 1, 1]  # never two writers at once
    order = session.history[1:]  # after the set-up's apply
    assert sorted(order) == sorted(jobs)

    again = _fresh(checkpoint, folders)
    for name in order:
        with again.job(name) as loaded:
            expected = jobs[name](loaded)
        got = outputs[name]
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        else:
            assert got == expected
    assert session.view == again.view  # the same adapters active and merged at the end
    assert session.view.merged == ("b",)


def test_a_job_is_refused_with_the_name_of_the_one_that_holds_the_model(checkpoint):
    session = ModelSession(models.load_model(str(checkpoint), device="cpu"))
    train = session.acquire("train", "training (step 3 of 50)")
    with pytest.raises(ModelBusy) as e:
        session.acquire("generate")
    assert str(e.value) == "The model is busy: training (step 3 of 50) is running; wait for it to end or stop it"
    assert e.value.holder is train
    assert session.busy_message("swap") == str(e.value)
    with pytest.raises(ModelBusy, match="training"):
        session.acquire("check")  # even a reader waits for a writer
    with pytest.raises(ModelBusy, match="training"):
        session.acquire("merge", wait=0.05)  # queued for a while, then refused
    train.release()
    train.release()  # idempotent
    assert session.busy_message("swap") is None
    with session.job("merge") as loaded:
        assert loaded is session.loaded


def test_readers_share_and_a_queued_writer_goes_before_later_readers(checkpoint):
    session = ModelSession(models.load_model(str(checkpoint), device="cpu"))
    r1 = session.acquire("check", "checking adapters")
    r2 = session.acquire("analyse")  # readers share
    assert len(session.holders()) == 2
    with pytest.raises(ModelBusy, match="checking adapters"):
        session.acquire("merge")
    got = []
    writer = threading.Thread(target=lambda: got.append(session.acquire("merge", wait=True)))
    writer.start()
    while not session._queue:
        threading.Event().wait(0.01)
    with pytest.raises(ModelBusy, match="merging an adapter"):
        session.acquire("check")  # a reader arriving now waits behind the queued writer
    r1.release()
    assert not got
    r2.release()
    writer.join(10)
    assert got and got[0].granted and session.holders() == [got[0]]
    got[0].release()
    assert session.history == ["check", "analyse", "merge"]


def test_the_view_follows_exclusive_jobs_and_no_model_is_refused(checkpoint, folders):
    empty = ModelSession()
    with pytest.raises(NoModel, match="No model is loaded"):
        with empty.job("generate"):
            pass
    session = ModelSession()
    session.set_loaded(models.load_model(str(checkpoint), device="cpu"))
    assert session.view.adapters == () and session.view.device == "cpu"
    ticket = session.acquire("merge")
    ticket.run(library_jobs.apply_to_model, folders["a"], "a", "merge")
    assert session.view.merged == ()  # taken when the job ends, not while it runs
    ticket.release()
    assert session.view.merged == ("a",) and session.view.state_of("a") == "merged"
    seen = []
    session.listeners.append(lambda: seen.append(session.view))
    with pytest.raises(ModelBusy):
        with session.job("train", wait=False):
            session.set_loaded(None)  # a load is a job of its own: refused while training holds it
    assert session.loaded is not None
    with session.job("train") as _:
        pass
    t = session.acquire("train")
    session.set_loaded(None, ticket=t)  # the holder may replace it
    t.release()
    assert session.loaded is None and session.view is None and seen


def test_a_reload_lets_the_old_model_go_before_reading_the_new_one(checkpoint, monkeypatch):
    from core.errors import Cancelled

    session = ModelSession(models.load_model(str(checkpoint), device="cpu"))
    real, seen = models.load_model, []

    def load(*args, **kwargs):
        seen.append(session.loaded)  # what the session holds while the new weights are read
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load)
    with session.acquire("load") as ticket:
        new = library_jobs.load_into_session(ticket, str(checkpoint), "cpu", "auto", False)
    assert seen == [None] and session.loaded is new and session.view.device == "cpu"
    with session.acquire("load") as ticket, pytest.raises(Cancelled):  # a cancel ends it at its first report
        library_jobs.load_into_session(ticket, str(checkpoint), "cpu", "auto", False, cancelled=lambda: True)
    assert session.loaded is None and not session.holders()


def test_core_session_imports_no_qt():
    import subprocess

    code = "import sys, core.session, core.library_jobs; sys.exit(1 if 'PySide6' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
