"""The fuzz suite (issue 19): every reader of a user's file, fed hostile inputs, ends in success or in
our one-line error; never a traceback, a hang, or a write outside its target.

Two kinds of case, both deterministic so CI is too:
* byte-level and field-level mutations of real seed files, ``CASES`` fixed seeds per reader
  (tests/fuzz_targets.py; ``benchmarks/fuzz.py --minutes N`` runs thousands more);
* structured inputs drawn by hypothesis (``derandomize=True``): adapter_config.json fields, run
  config.json sections, zip members, GGUF metadata of wrong types and absurd values.
The failures these found, fixed, are kept as explicit cases in tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft
import fuzzing

CASES = 8
"""Fixed seeds per reader here (about a minute for all on two cores); the long mode runs thousands."""

_counter = itertools.count()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return ft.Seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def _failures(results) -> str:
    return "\n\n".join(f"{what}\n  -> {o.kind} ({o.seconds:.1f} s): {o.detail}" for o, what in results if o.failed)


@pytest.mark.parametrize("reader", list(ft.BY_NAME))
def test_mutated_files_end_in_one_line_or_success(reader, seeds, tmp_path):
    results = [ft.run_case(ft.BY_NAME[reader], seeds, tmp_path / str(seed), seed, bound=60)
               for seed in range(CASES)]
    assert not _failures(results), _failures(results)
    # the cases reach the reader: not every one ends before it (a mutator that only broke the
    # encoding would test nothing but the decoder)
    assert len({o.detail for o, _ in results}) > 1


def _structured(seeds, tmp_path, kind, value):
    root = tmp_path / f"case-{next(_counter)}"
    old = fuzzing.os.environ.get("LORA_STUDIO_HOME")
    fuzzing.os.environ["LORA_STUDIO_HOME"] = str(root / "home")
    try:
        case = ft.structured_case(seeds, root, kind, value)
        outcome = fuzzing.check(case.call, root=root, writable=case.writable, bound=60, cli=case.cli)
    finally:
        fuzzing.os.environ["LORA_STUDIO_HOME"] = old
    assert not outcome.failed, f"{case.what}\n  -> {outcome.kind}: {outcome.detail}"


FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=25,
                suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=20),
                         st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["-1", ".*", "(", ""]))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                              max_size=3),
                           max_leaves=8)

ADAPTER_FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "use_rslora",
                  "peft_type", "bias", "init_lora_weights", "modules_to_save", "fan_in_fan_out", "base_model_name_or_path",
                  "use_dora", "task_type", "layers_to_transform"]


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(ADAPTER_FIELDS), json_values, min_size=1, max_size=3))
def test_adapter_config_fields_of_any_type(seeds, tmp_path, fields):
    _structured(seeds, tmp_path, "adapter-config", fields)


RUN_FIELDS = {"model": ["source", "device", "precision", "quantize", "gradient_checkpointing"],
              "lora": ["targets", "rank", "alpha", "dropout", "rslora", "init"],
              "data": ["path", "format", "fields", "max_length", "packing", "val_split", "chat_template"],
              "train": ["steps", "epochs", "batch_size", "grad_accum", "lr", "scheduler", "warmup", "seed",
                        "save_every", "eval_every", "max_grad_norm"]}


@st.composite
def run_config_changes(draw):
    section = draw(st.sampled_from([*RUN_FIELDS, "name", "out"]))
    if section in ("name", "out"):
        return {section: draw(json_values)}
    keys = st.sampled_from(RUN_FIELDS[section])
    return {section: draw(st.one_of(st.dictionaries(keys, json_values, min_size=1, max_size=2), json_scalars))}


@FUZZ
@given(change=run_config_changes())
def test_run_config_fields_of_any_type(seeds, tmp_path, change):
    _structured(seeds, tmp_path, "run-config", change)


@settings(FUZZ, max_examples=15)
@given(members=st.lists(st.tuples(st.sampled_from(ft.ZIP_NAMES),
                                  st.sampled_from(["config", "weights", "studio", "junk", "empty", "json-deep"]),
                                  st.booleans()), max_size=5))
def test_zip_members_names_links_and_duplicates(seeds, tmp_path, members):
    _structured(seeds, tmp_path, "zip", members)


gguf_values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**64 - 1), st.floats(width=32),
                        st.text(max_size=12), st.lists(st.integers(0, 2**31), min_size=1, max_size=3))


@settings(FUZZ, max_examples=20)
@given(overrides=st.dictionaries(st.sampled_from([*ft.GGUF_FIELDS, "general.architecture", "llama.vocab_size",
                                                  "tokenizer.ggml.bos_token_id", "llama.rope.scaling.type"]),
                                 gguf_values, min_size=1, max_size=3))
def test_gguf_metadata_of_wrong_types_and_absurd_values(seeds, tmp_path, overrides):
    _structured(seeds, tmp_path, "gguf", overrides)


def test_the_checker_catches_what_it_must():
    """The harness itself: a traceback, a hang, two error lines and a write outside are failures."""
    import os
    import tempfile
    from pathlib import Path

    from core.errors import StudioError

    root = Path(tempfile.mkdtemp())
    assert fuzzing.check(lambda: 1 / 0, root=root).kind == "crash"
    assert fuzzing.check(lambda: (_ for _ in ()).throw(RecursionError()), root=root).kind == "crash"

    def spin():
        while True:
            pass
    assert fuzzing.check(spin, root=root, bound=0.5).kind == "hang"

    def loud():
        print("error: one\nerror: two", file=fuzzing.sys.stderr)
        return 1
    assert fuzzing.check(loud, root=root, cli=True).kind == "stderr"
    assert fuzzing.check(lambda: (root / "stray").write_text("x"), root=root).kind == "wrote"
    (root / "ok").mkdir()
    assert fuzzing.check(lambda: (root / "ok" / "f").write_text("x"), root=root, writable=[root / "ok"]).kind == "ok"

    def refuse():
        raise StudioError("bad file")
    assert fuzzing.check(refuse, root=root).kind == "error"
    assert os.getcwd() != str(root)
