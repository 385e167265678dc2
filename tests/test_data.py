"""core/data.py and ``lora-studio data``: every format, every bad input, labels exactly where the
answer is, on tiny files written here and the tiny offline ChatML tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_checkpoint, tiny_tokenizer
from core import data
from core.config import DataConfig
from core.errors import Cancelled, StudioError

IM_END = 1  # tiny_tokenizer: <|im_end|> is id 1, the end of a turn and the EOS

ALPACA = [
    {"instruction": "Translate to French", "input": "cheese", "output": "fromage"},
    {"instruction": "Name a colour", "input": "", "output": "blue"},
    {"instruction": "Say hi", "input": "", "output": "hi there"},
]
CHAT = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Ciao"}]}]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello there"}]},
            {"conversations": [{"from": "human", "value": "Fox?"}, {"from": "gpt", "value": "quick brown"}]}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(enc: data.Encoded, tok) -> str:
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != -100], skip_special_tokens=False)


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def plain_tok():
    return tiny_tokenizer(chat_template=False)


# -- reading every kind of file -------------------------------------------------------------------

def test_jsonl_instruction(tmp_path):
    src = data.read(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert (src.format, src.rows) == ("instruction", 3)
    assert src.fields == {"instruction": "instruction", "input": "input", "output": "output"}
    assert src.row(1)["output"] == "blue"


def test_json_list_and_wrapped_object(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"version": 2, "data": ALPACA}), encoding="utf-8")
    assert data.read(tmp_path / "l.json").rows == 3
    src = data.read(tmp_path / "d.json")
    assert (src.format, src.rows) == ("instruction", 3)
    assert any("'data'" in n for n in src.notes)


def test_json_single_chat_row_is_not_unwrapped(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps([CHAT[0]]), encoding="utf-8")
    src = data.read(tmp_path / "one.json")
    assert (src.format, src.rows) == ("chat", 1)


def test_csv_tsv_and_parquet(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"question": ["2+2?", "Capital of France?"], "answer": ["4", "Paris"]})
    df.to_csv(tmp_path / "q.csv", index=False)
    df.to_csv(tmp_path / "q.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "q.parquet")
    for name in ("q.csv", "q.tsv", "q.parquet"):
        src = data.read(tmp_path / name)
        assert (src.format, src.rows) == ("prompt-completion", 2), name
        assert src.fields == {"prompt": "question", "completion": "answer"}


def test_csv_with_byte_order_mark(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufefftext\nhello\nworld\n".encode("utf-8"))
    src = data.read(tmp_path / "bom.csv")
    assert src.columns == ["text"] and src.format == "text"


def test_txt_by_line_and_by_paragraph(tmp_path):
    (tmp_path / "lines.txt").write_text("first line\nsecond line\n\n", encoding="utf-8")
    src = data.read(tmp_path / "lines.txt")
    assert (src.format, src.rows) == ("text", 2)
    assert src.row(1)["text"] == "second line"
    assert "per line" in src.notes[0]
    (tmp_path / "paras.txt").write_text("a poem\nof two lines\n\n\nanother\nparagraph\n", encoding="utf-8")
    src = data.read(tmp_path / "paras.txt")
    assert [src.row(i)["text"] for i in range(src.rows)] == ["a poem\nof two lines", "another\nparagraph"]
    assert "paragraph" in src.notes[0]


def test_save_to_disk_folder_and_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "ds"))
    src = data.read(tmp_path / "ds")
    assert (src.format, src.rows, src.fields) == ("chat", 2, {"messages": "conversations"})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA),
                               "test": datasets.Dataset.from_list(ALPACA[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = data.read(tmp_path / "dd")
    assert src.rows == 3 and "train" in src.notes[0]


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(StudioError, match="save_to_disk"):
        data.read(tmp_path / "stuff")


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "a.xml").write_text("<a/>")
    with pytest.raises(StudioError, match="cannot read '.xml'"):
        data.read(tmp_path / "a.xml")
    with pytest.raises(StudioError, match="no such file"):
        data.read(tmp_path / "nope.jsonl")


def test_arrow_cache_lives_in_studio_home(tmp_path, studio_home):
    data.read(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert any((studio_home / "cache" / "datasets").iterdir())


# -- detection and field mapping ------------------------------------------------------------------

@pytest.mark.parametrize("columns,row,fmt,fields", [
    (["messages"], {"messages": []}, "chat", {"messages": "messages"}),
    (["conversations", "id"], {"conversations": []}, "chat", {"messages": "conversations"}),
    (["instruction", "input", "output"], None, "instruction",
     {"instruction": "instruction", "input": "input", "output": "output"}),
    (["instruction", "context", "response", "category"], None, "instruction",  # Dolly
     {"instruction": "instruction", "input": "context", "output": "response"}),
    (["prompt", "completion"], None, "prompt-completion", {"prompt": "prompt", "completion": "completion"}),
    (["Question", "Answer"], None, "prompt-completion", {"prompt": "Question", "completion": "Answer"}),
    (["text", "meta"], None, "text", {"text": "text"}),
])
def test_detect_format(columns, row, fmt, fields):
    assert data.detect_format(columns, row) == (fmt, fields)


def test_detect_format_failure_lists_fields_and_formats():
    with pytest.raises(StudioError) as e:
        data.detect_format(["foo", "bar"], {"foo": 1, "bar": 2})
    msg = str(e.value)
    assert "foo, bar" in msg and "instruction (instruction, input, output)" in msg and "--fields" in msg


def test_missing_field_message_names_file_fields_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "reply": "b"}])
    with pytest.raises(StudioError) as e:
        data.read(path)
    assert str(path) in str(e.value) and "question, reply" in str(e.value)
    with pytest.raises(StudioError) as e:
        data.read(path, format="instruction")
    msg = str(e.value)
    assert "instruction, output" in msg and "columns found: question, reply" in msg and "chat (messages" in msg


def test_override_and_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "Say hi", "a": "hi", "text": "x"}])
    src = data.read(path, fields={"instruction": "q", "output": "a"})  # format follows from the fields
    assert (src.format, src.fields) == ("instruction", {"instruction": "q", "output": "a"})
    src = data.read(path, format="prompt-completion", fields=data.parse_fields("prompt=q, completion=a"))
    assert src.fields == {"prompt": "q", "completion": "a"}
    assert data.read(path).format == "text"  # detection alone finds the text column
    with pytest.raises(StudioError, match="no column 'zz'"):
        data.read(path, format="instruction", fields={"instruction": "q", "output": "zz"})
    with pytest.raises(StudioError, match="'prompt' is not a field of the instruction format"):
        data.read(path, format="instruction", fields={"prompt": "q"})
    with pytest.raises(StudioError, match="not field=column"):
        data.parse_fields("output")


# -- bad files ------------------------------------------------------------------------------------

def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n', encoding="utf-8")
    with pytest.raises(StudioError) as e:
        data.read(path)
    assert f"{path}:4:" in str(e.value) and "not valid JSON" in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(StudioError, match=r"list.jsonl:2: expected one JSON object per line"):
        data.read(path)


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",,}\n]\n', encoding="utf-8")
    with pytest.raises(StudioError, match=r"bad.json:3: not valid JSON"):
        data.read(path)


@pytest.mark.parametrize("name,content", [
    ("e.jsonl", b""), ("e.csv", b""), ("e.txt", b"\n\n  \n"), ("e.json", b"  "), ("e.parquet", b""),
])
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StudioError, match="the file is empty"):
        data.read(tmp_path / name)


def test_file_without_examples(tmp_path):
    (tmp_path / "none.json").write_text("[]", encoding="utf-8")
    (tmp_path / "header.csv").write_text("instruction,output\n", encoding="utf-8")
    for name in ("none.json", "header.csv"):
        with pytest.raises(StudioError, match="no examples"):
            data.read(tmp_path / name)


@pytest.mark.parametrize("name,content,line,offset", [
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, 28),
    ("latin1.csv", b"text\nfine\ncaf\xe9 au lait\n", 3, 13),
    ("latin1.txt", b"one\ntwo\nthr\xffee\n", 3, 11),
])
def test_non_utf8_file_names_line_and_byte(tmp_path, name, content, line, offset):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StudioError) as e:
        data.read(tmp_path / name)
    msg = str(e.value)
    assert f"line {line} (byte {offset})" in msg and "not UTF-8" in msg and name in msg


# -- encoding: what is trained --------------------------------------------------------------------

def test_prompt_masked_answer_and_end_of_turn_trained(tok):
    enc = data.encode(ALPACA[0], tok, "instruction", {"instruction": "instruction", "input": "input",
                                                      "output": "output"}, max_length=512)
    assert trained_text(enc, tok) == "fromage<|im_end|>"
    trained = [i for i, l in enumerate(enc.labels) if l != -100]
    assert enc.labels[trained[-1]] == IM_END  # the end-of-turn token is the last trained label
    assert trained == list(range(trained[0], trained[-1] + 1))  # one contiguous answer
    assert all(l == -100 for l in enc.labels[: trained[0]])  # the prompt is masked
    assert tok.decode(enc.input_ids[trained[-1] + 1:]) == "\n"  # ChatML's newline after it is not
    # the rendered text is exactly the chat template's, tokenised whole as at inference
    messages = [{"role": "user", "content": "Translate to French\n\ncheese"},
                {"role": "assistant", "content": "fromage"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert enc.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    # and the prompt alone (what generation starts from) is a prefix ending where training starts
    prompt = data.prompt_ids(tok, messages[:1])
    assert enc.input_ids[: len(prompt)] == prompt and len(prompt) == trained[0]


def test_plain_template_without_chat_template(plain_tok):
    enc = data.encode(ALPACA[0], plain_tok, "instruction", {"instruction": "instruction", "input": "input",
                                                            "output": "output"}, max_length=512)
    text = plain_tok.decode(enc.input_ids, skip_special_tokens=False)
    assert text == "### Instruction:\nTranslate to French\n\ncheese\n\n### Response:\nfromage<|im_end|>"
    assert trained_text(enc, plain_tok) == "fromage<|im_end|>" and enc.labels[-1] == IM_END
    assert data.format_prompt(plain_tok, [{"role": "user", "content": "Hi"}]) == \
        "### Instruction:\nHi\n\n### Response:\n"


def test_prompt_completion_plain_is_raw_concatenation(plain_tok):
    enc = data.encode({"prompt": "2+2=", "completion": "4"}, plain_tok, "prompt-completion",
                      {"prompt": "prompt", "completion": "completion"}, max_length=64)
    assert plain_tok.decode(enc.input_ids, skip_special_tokens=False) == "2+2=4<|im_end|>"
    assert trained_text(enc, plain_tok) == "4<|im_end|>"


def test_text_format_trains_everything_and_ends_with_eos(tok):
    enc = data.encode({"text": "The quick fox"}, tok, "text", {"text": "text"}, max_length=64)
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == IM_END


def test_multi_turn_chat_trains_every_assistant_turn(tok, plain_tok):
    for t in (tok, plain_tok):
        enc = data.encode(CHAT[1], t, "chat", {"messages": "messages"}, max_length=512)
        pieces = [p for p, trained in data.render_marked(enc, t) if trained]
        assert pieces == ["Hello<|im_end|>", "Ciao<|im_end|>"]
        assert "".join(p for p, _ in data.render_marked(enc, t)) == t.decode(enc.input_ids, skip_special_tokens=False)


def test_sharegpt_roles_mapped(tok):
    enc = data.encode(SHAREGPT[0], tok, "chat", {"messages": "conversations"}, max_length=512)
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    assert "<|im_start|>system\nBe kind." in text and "<|im_start|>user\nHi" in text
    assert trained_text(enc, tok) == "Hello there<|im_end|>"


def test_trailing_user_turn_dropped_and_content_parts(tok):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "and?"}]}
    enc = data.encode(row, tok, "chat", {"messages": "messages"}, max_length=512)
    assert "and?" not in tok.decode(enc.input_ids) and trained_text(enc, tok) == "Yo<|im_end|>"


def test_template_without_end_token_gets_eos(tok):
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    enc = data.encode(CHAT[0], tok, "chat", {"messages": "messages"}, max_length=512)
    assert trained_text(enc, tok) == "4\n<|im_end|>" and enc.input_ids[-1] == IM_END


def test_train_on_prompt(tok):
    enc = data.encode(CHAT[0], tok, "chat", {"messages": "messages"}, max_length=512, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_truncation_flagged(tok):
    n = len(data.encode(CHAT[1], tok, "chat", {"messages": "messages"}, max_length=512))
    enc = data.encode(CHAT[1], tok, "chat", {"messages": "messages"}, max_length=n - 3)
    assert enc.truncated and len(enc) == n - 3
    assert not data.encode(CHAT[0], tok, "chat", {"messages": "messages"}, max_length=512).truncated


@pytest.mark.parametrize("row,fmt,fields,match", [
    ({"instruction": "x", "output": "  "}, "instruction", {"instruction": "instruction", "output": "output"},
     "empty answer"),
    ({"messages": [{"role": "user", "content": "x"}]}, "chat", {"messages": "messages"}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "chat", {"messages": "messages"}, "unknown role 'robot'"),
    ({"instruction": ["x"], "output": "y"}, "instruction", {"instruction": "instruction", "output": "output"},
     "field 'instruction' is list"),
])
def test_bad_rows_raise_row_problem(tok, row, fmt, fields, match):
    with pytest.raises(data.RowProblem, match=match):
        data.encode(row, tok, fmt, fields, max_length=64)


# -- prepare: the whole file ----------------------------------------------------------------------

def many(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}", "input": "", "output": "fox " * (1 + i % 7)} for i in range(n)]


def test_prepare_stats_progress_and_first_example(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", many(25))
    calls = []
    p = data.prepare(DataConfig(path=str(path)), tok, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 25) and calls[-1] == (25, 25)
    assert len(p.train) == 25 and len(p.val) == 0 and p.problems == [] and p.truncated == 0
    st = p.stats
    assert st["examples"] == 25 and st["lengths"]["count"] == 25
    assert st["tokens"] == int(p.train.lengths.sum()) and 0 < st["trained_tokens"] < st["tokens"]
    assert st["lengths"]["min"] <= st["lengths"]["p50"] <= st["lengths"]["p90"] <= st["lengths"]["max"]
    assert sum(st["lengths"]["histogram"]["counts"]) == 25
    assert p.example.input_ids == p.train[0].input_ids
    assert p.format == "instruction"


def test_progress_in_chunks_and_cancel(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(data, "CHUNK", 4)
    path = write_jsonl(tmp_path / "m.jsonl", many(10))
    calls = []
    data.prepare(DataConfig(path=str(path)), tok, progress=lambda d, t: calls.append(d))
    assert calls == [0, 4, 8, 10]
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) >= 2  # cancel after the first chunk

    with pytest.raises(Cancelled):  # another max length: not the tokenised result cached above
        data.prepare(DataConfig(path=str(path), max_length=256), tok, cancel=cancel)
    assert len(asked) == 2


def test_truncated_count(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", many(14))
    full = data.prepare(DataConfig(path=str(path)), tok)
    limit = int(np.median(full.train.lengths))
    cut = data.prepare(DataConfig(path=str(path), max_length=limit), tok)
    assert cut.truncated == int((full.train.lengths > limit).sum()) > 0
    assert cut.stats["truncated"] == cut.truncated and cut.train.lengths.max() == limit


def test_prompt_longer_than_max_length_is_skipped(tmp_path, tok):
    rows = many(3) + [{"instruction": "word " * 100, "input": "", "output": "x"}]
    p = data.prepare(DataConfig(path=str(write_jsonl(tmp_path / "m.jsonl", rows)), max_length=60), tok)
    assert len(p.train) == 3 and p.stats["skipped"] == 1
    assert "prompt alone fills --max-length 60" in p.problems[0] and "row 4" in p.problems[0]


def test_split_by_seed_is_reproducible(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", many(40))
    cfg = DataConfig(path=str(path), val_split=0.25)
    a, b, c = (data.prepare(cfg, tok, seed=s) for s in (1, 1, 2))
    assert (len(a.train), len(a.val)) == (30, 10)
    assert a.val.rows.tolist() == b.val.rows.tolist() != c.val.rows.tolist()
    assert sorted(a.train.rows.tolist() + a.val.rows.tolist()) == list(range(40))
    assert a.stats["val_examples"] == 10


def test_empty_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", many(3))
    with pytest.raises(StudioError, match="validation split would be empty"):
        data.prepare(DataConfig(path=str(path), val_split=0.1), tok)


def test_empty_answers_are_listed_with_row_numbers(tmp_path, tok):
    rows = many(6)
    rows[1]["output"] = ""
    rows[4]["output"] = "   "
    p = data.prepare(DataConfig(path=str(write_jsonl(tmp_path / "m.jsonl", rows))), tok)
    assert len(p.train) == 4 and p.stats["skipped"] == 2
    assert p.problems == ["2 rows skipped (empty answer): rows 2, 5"]


def test_all_rows_bad_is_an_error(tmp_path, tok):
    rows = [{"instruction": "x", "output": ""}] * 3
    with pytest.raises(StudioError, match="no example left to train on.*empty answer"):
        data.prepare(DataConfig(path=str(write_jsonl(tmp_path / "m.jsonl", rows))), tok)


def test_packing(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", many(30))
    plain = data.prepare(DataConfig(path=str(path), max_length=128, val_split=0.2), tok, seed=3)
    packed = data.prepare(DataConfig(path=str(path), max_length=128, val_split=0.2, packing=True), tok, seed=3)
    assert len(packed.train) < len(plain.train) and packed.stats["train_sequences"] == len(packed.train)
    assert packed.train.lengths.max() <= 128
    # the same tokens and labels, in the same order, only grouped
    assert np.concatenate([e.input_ids for e in packed.train]).tolist() == \
        np.concatenate([e.input_ids for e in plain.train]).tolist()
    assert [l for e in packed.train for l in e.labels] == [l for e in plain.train for l in e.labels]
    assert [e.input_ids for e in packed.val] == [e.input_ids for e in plain.val]  # never packed
    # each packed sequence is whole examples, each ending on its trained end-of-turn token
    for e in packed.train:
        assert e.input_ids[-1] == 201 or e.labels[-2] == IM_END or e.labels[-1] == IM_END


def test_prepare_uses_sample_dataset_when_no_path(tok):
    p = data.prepare(DataConfig(max_length=256), tok)
    assert p.format == "chat" and len(p.train) == 300 and p.truncated == 0


# -- batches, statistics, rendering ---------------------------------------------------------------

def test_collate_right_pads():
    import torch

    batch = data.collate([data.Encoded([5, 6, 7], [-100, 6, 7]), {"input_ids": [8], "labels": [8]}], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_token_stats():
    s = data.token_stats([10, 20, 30, 40, 1000])
    assert (s["count"], s["min"], s["max"], s["mean"], s["p50"]) == (5, 10, 1000, 220.0, 30)
    assert s["p99"] == 1000 and sum(s["histogram"]["counts"]) == 5
    assert len(s["histogram"]["edges"]) == len(s["histogram"]["counts"]) + 1
    assert data.token_stats([])["count"] == 0


def test_encoded_set_roundtrip():
    items = [data.Encoded([1, 2, 3], [-100, 2, 3], True), data.Encoded([4], [4])]
    s = data.EncodedSet.from_encoded(items)
    assert len(s) == 2 and s[0] == items[0] and s[-1] == items[1] and s[0:2] == items
    assert s.lengths.tolist() == [3, 1] and s.tokens == 4 and s.trained_tokens == 3
    with pytest.raises(IndexError):
        s[2]


def test_render_text_marks_trained_tokens(tok):
    enc = data.encode(CHAT[0], tok, "chat", {"messages": "messages"}, max_length=64)
    assert data.render_text(enc, tok, style="brackets") == \
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n⟦4<|im_end|>⟧\n"
    assert "\x1b[4m4<|im_end|>\x1b[24m" in data.render_text(enc, tok, style="ansi")
    assert data.end_of_turn_ids(tok) == [IM_END]


# -- the sample dataset ---------------------------------------------------------------------------

def test_sample_dataset_is_what_the_generator_writes(tmp_path):
    sys.path.insert(0, str(data.sample_dataset().parent))
    try:
        import make_sample_dataset as gen
    finally:
        sys.path.pop(0)
    assert gen.main(["--check"]) == 0
    src = data.read(data.sample_dataset())
    assert (src.format, src.rows) == ("chat", 300)
    prompts = set()
    for row in src.dataset:
        user, answer = row["messages"]
        obj = json.loads(answer["content"])
        assert list(obj) == ["drink", "size", "quantity", "milk", "extra_shot"]
        prompts.add(user["content"])
    assert len(prompts) == 300 and not prompts & set(gen.HELD_OUT)


# -- the command line -----------------------------------------------------------------------------

def test_cli_data_json_and_plain(tmp_path, capsys):
    from studio.cli import run

    ckpt = tiny_checkpoint(tmp_path / "tiny")
    path = write_jsonl(tmp_path / "m.jsonl", many(8) + [{"instruction": "x", "output": ""}])
    assert run(["data", str(path), "--model", str(ckpt), "--json", "--max-length", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "instruction" and out["rows"] == 9 and out["chat_template"] is True
    assert out["stats"]["examples"] == 8 and out["stats"]["lengths"]["count"] == 8
    assert out["truncated"] == out["stats"]["truncated"]
    assert out["problems"] == ["1 row skipped (empty answer): row 9"]
    first = out["first_example"]
    assert first["text"].endswith("⟦fox <|im_end|>⟧\n") and [" fox <|im_end|>", True] not in first["pieces"]
    assert first["labels"][-2] == IM_END

    assert run(["data", str(path), "--model", str(ckpt), "--val-split", "0.25", "--packing"]) == 0
    text = capsys.readouterr().out
    assert "format instruction" in text and "tokens per example" in text and "problems:" in text
    assert "row 9" in text and "⟦fox <|im_end|>⟧" in text and "validation" in text


def test_cli_data_errors_are_one_line(tmp_path, capsys):
    from studio.cli import run

    ckpt = tiny_checkpoint(tmp_path / "tiny")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    capsys.readouterr()
    assert run(["data", str(bad), "--model", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad}:2:" in err and err.count("\n") == 1
    assert run(["data", str(bad), "--model", str(ckpt), "--fields", "nonsense"]) == 1
    assert "--fields" in capsys.readouterr().err


def test_plain_template_keeps_a_bos_the_tokenizer_adds():
    from tokenizers import processors

    tok = tiny_tokenizer(chat_template=False)
    tok.bos_token = "<|im_start|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 0)])
    assert tok("Hi")["input_ids"][0] == 0  # this tokenizer puts BOS in front of plain text
    enc = data.encode(ALPACA[1], tok, "instruction", {"instruction": "instruction", "output": "output"},
                      max_length=128)
    assert enc.input_ids[0] == 0 and enc.input_ids.count(0) == 1 and enc.labels[0] == -100
    prompt = data.prompt_ids(tok, [{"role": "user", "content": "Name a colour"}])
    first = next(i for i, l in enumerate(enc.labels) if l != -100)
    assert enc.input_ids[:first] == prompt


def test_cli_data_imports_no_torch(tmp_path):
    """`lora-studio data` on a model folder with a plain fast tokenizer, first and second look, never
    imports torch (it cost ~4 s of a second look's 7 s): checked in a fresh process."""
    import os
    import subprocess

    ckpt = tiny_checkpoint(tmp_path / "ck")
    path = write_jsonl(tmp_path / "m.jsonl", many(20))
    code = ("import sys; from studio.__main__ import main\n"
            f"for _ in range(2): assert main(['data', {str(path)!r}, '--model', {str(ckpt)!r}, '--json']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(os.environ, LORA_STUDIO_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout[:p.stdout.index("\n}\n") + 2])["stats"]["examples"] == 20
