"""core.chat: the one end-of-turn list, and what a model without a chat template gets (a choice:
plain text, ChatML or a template file; never a silent default) on the command line and the Data page."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_checkpoint, tiny_gpt2, tiny_tokenizer

from core import chat, data, generate
from core.config import DataConfig, RunConfig

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"It is {2 * i + 1}."} for i in range(6)]
FIELDS = {"instruction": "instruction", "output": "output", "input": "input", "system": "system"}


def _pieces(enc, tok):
    return "".join(f"[{t}]" if trained else t for t, trained in data.render_marked(enc, tok))


def test_one_end_of_turn_list_for_training_and_generation():
    assert data.END_OF_TURN is chat.END_OF_TURN and generate.END_OF_TURN_TOKENS is chat.END_OF_TURN
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|eom_id|>", "<|end_of_text|>"]})
    model = tiny_gpt2(vocab_size=400, eos_token_id=2)
    model.generation_config.eos_token_id = [2, tok.convert_tokens_to_ids("<|eom_id|>")]
    stops = generate.stop_token_ids(model, tok)
    assert set(data.end_of_turn_ids(tok)) <= stops
    assert {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eom_id|>", "<|end_of_text|>")} <= stops
    assert 2 in stops  # the model's own EOS ids count too
    assert chat.end_of_turn_ids(tok, model)[0] == tok.eos_token_id


def test_a_model_without_a_template_is_told_and_can_choose():
    tok = tiny_tokenizer(chat_template=False)
    said = chat.describe(tok)
    assert "no chat template" in said and "plain text" in said and "ChatML" in said
    plain = data.encode(ROWS[0], tok, "instruction", FIELDS, max_length=128)
    assert _pieces(plain, tok).startswith("### Instruction:\nAdd 0 and 1.")
    chatml = data.encode(ROWS[0], tok, "instruction", FIELDS, max_length=128, chat_template="chatml")
    assert _pieces(chatml, tok) == ("<|im_start|>user\nAdd 0 and 1.<|im_end|>\n<|im_start|>assistant\n"
                                    "[It is 1.<|im_end|>]\n")
    assert tok.chat_template is None  # the caller's tokenizer is never changed
    assert "ChatML" in chat.describe(tok, "chatml")
    # a model with a template can be trained as plain text too
    own = tiny_tokenizer()
    assert "model's chat template: ChatML" in chat.describe(own)
    assert _pieces(data.encode(ROWS[0], own, "instruction", FIELDS, max_length=128, chat_template="plain"),
                   own).startswith("### Instruction:")


def test_a_template_file_is_a_choice_and_bad_ones_are_one_line(tmp_path):
    tok = tiny_tokenizer(chat_template=False)
    gemma = Path(__file__).parent / "data" / "chat_templates" / "gemma2.jinja"
    enc = data.encode(ROWS[0], tok, "instruction", FIELDS, max_length=200, chat_template=str(gemma))
    assert "<start_of_turn>model\n[It is 1." in _pieces(enc, tok)  # no <end_of_turn> token: the EOS is taught
    assert chat.choice_problem(str(gemma)) is None and chat.choice_problem("chatml") is None
    for bad, words in ((tmp_path / "nope.jinja", "no such file"), (tmp_path / "t.bin", "not a .jinja file")):
        problem = chat.choice_problem(str(bad))
        assert problem.startswith(f"--chat-template {bad}") and words in problem and "\n" not in problem
    notes = tmp_path / "notes.jinja"
    notes.write_text("hello {{ name }}")
    assert "not a chat template" in chat.choice_problem(str(notes))
    assert any(p.startswith("--chat-template") for p in RunConfig(data=DataConfig(chat_template="zephyr")).problems())


def test_prepare_uses_the_choice(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = tiny_tokenizer(chat_template=False)
    plain = data.prepare(DataConfig(path=str(path)), tok)
    chatml = data.prepare(DataConfig(path=str(path), chat_template="chatml"), tok)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert im_start not in plain.train[0].input_ids and im_start in chatml.train[0].input_ids


def test_cli_data_and_train_take_chat_template(tmp_path, capsys):
    from studio.cli import run

    ckpt = tiny_checkpoint(tmp_path / "gpt2", arch="gpt2", chat_template=False)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert run(["data", str(path), "--model", str(ckpt)]) == 0
    assert "has no chat template" in capsys.readouterr().out
    assert run(["data", str(path), "--model", str(ckpt), "--chat-template", "chatml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chat_template"] is False and "ChatML" in out["rendering"] and "<|im_start|>" in out["first_example"]["text"]
    assert run(["data", str(path), "--model", str(ckpt), "--chat-template", str(tmp_path / "x.jinja")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--chat-template" in err and err.count("\n") == 1
    assert run(["train", "--model", str(ckpt), "--data", str(path), "--out", str(tmp_path / "run"), "--steps", "1",
                "--batch-size", "2", "--targets", "c_attn", "--chat-template", "chatml", "--device", "cpu",
                "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["chat_template"] == "chatml"


def test_data_page_offers_the_choice_when_the_model_has_no_template(qtbot):
    from studio.pages.data import DataPage
    from studio.state import StudioState

    state = StudioState()
    page = DataPage(state)
    qtbot.addWidget(page)
    page.show()
    tok = tiny_tokenizer(chat_template=False)
    state.tokenizer = tok
    state.tokenizer_changed.emit(tok)
    qtbot.waitUntil(lambda: bool(page.inspected and page.inspected.get("pieces")), timeout=60_000)
    note = page.template_note.text()
    assert note.startswith("This model has no chat template") and "bold" in page.template_note.styleSheet()
    assert page.template.currentData() == "auto"
    assert "### Instruction" in "".join(t for t, _ in page.inspected["pieces"])
    page.template.setCurrentIndex(page.template.findData("chatml"))
    page._on_template(page.template.currentIndex())
    assert state.config.data.chat_template == "chatml" and page.template_note.text() == ""
    qtbot.waitUntil(lambda: bool(page.inspected and page.inspected.get("pieces")
                                 and page.inspected["pieces"][0][0].startswith("<|im_start|>")), timeout=60_000)


def test_the_playground_prompts_an_adapter_the_way_it_was_trained(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from core import models
    from core.train import Trainer
    from studio.pages.playground import generate_answers

    ckpt = tiny_checkpoint(tmp_path / "gpt2", arch="gpt2", chat_template=False)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = models.load_tokenizer(str(ckpt))
    question = [{"role": "user", "content": "Add 1 and 2."}]
    for choice, want in (("chatml", data.prompt_ids(chat.with_template(tok, "chatml"), question)),
                         ("auto", data.prompt_ids(tok, question))):  # no template: the plain one, as trained
        cfg = RunConfig()
        cfg.model.source, cfg.model.device = str(ckpt), "cpu"
        cfg.data.path, cfg.data.chat_template = str(path), choice
        cfg.lora.rank, cfg.lora.targets = 2, "c_attn"
        cfg.train.steps, cfg.train.batch_size, cfg.train.save_every = 1, 2, 0
        cfg.out = str(tmp_path / choice)
        folder = Trainer(cfg).run().adapter
        recorded = json.loads((folder / "studio.json").read_text())["dataset"]["chat_template"]
        assert recorded == ("chatml" if choice == "chatml" else "plain")
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        base, adapted = generate_answers(model, tok, "Add 1 and 2.", [None, {"name": "a", "folder": folder}],
                                         {"max_new_tokens": 1, "greedy": True}, progress=lambda _: None,
                                         cancelled=lambda: False)
        assert adapted.prompt_tokens == len(want) != base.prompt_tokens  # the base model continues plain text
        assert base.prompt_tokens == len(generate.format_prompt(tok, "Add 1 and 2."))
        # the merged export's tokenizer renders chats as the adapter was trained
        from transformers import AutoTokenizer

        from core import export

        report = export.export_merged(str(ckpt), [folder], out=tmp_path / f"merged-{choice}")
        written = AutoTokenizer.from_pretrained(tmp_path / f"merged-{choice}").chat_template
        assert written == (chat.CHATML if choice == "chatml" else None)
        assert any("chat template" in w for w in report["warnings"]) == (choice == "chatml")


# -- SmolLM3: its published template, checked the way tests/test_families.py checks the others -------

SMOLLM3_THINK = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions.")


def test_smollm3_template_renders_trains_answers_and_stops_like_the_family(monkeypatch):
    """SmolLM3 (tests/data/chat_templates/smollm3.jinja): ChatML turns under a generated system header
    (metadata, today's date, reasoning mode), which its template leaves without an <|im_end|> when no
    tools are given; with /no_think each answer opens with an empty reasoning block, which belongs to
    the prompt, so the trained tokens are the answers and their <|im_end|> in both modes."""
    import test_families as fam

    monkeypatch.setitem(fam.CHAT, "smollm3", (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
                                              None, "<|im_end|>", "<|im_end|>"))
    tok = fam.family_tokenizer("smollm3")
    assert chat.template_style(tok.chat_template) == "chatml"
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    turns = ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n{think}4<|im_end|>\n"
             "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n{think}6<|im_end|>\n")
    header = ("<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n"
              f"Today Date: {fam._today('%d %B %Y')}\nReasoning Mode: {{mode}}\n\n## Custom Instructions\n\n")
    for system, mode, instructions, think in (
            (None, "/think", None, ""),
            ("Be brief. /no_think", "/no_think", "Be brief.\n\n", "<think>\n\n</think>\n")):
        conversation = ([{"role": "system", "content": system}] if system else []) + fam.CONVERSATION
        enc = data.encode({"messages": conversation}, tok, "chat", {"messages": "messages"}, max_length=4096)
        text = tok.decode(enc.input_ids)
        head = header.format(mode=mode)
        assert text.startswith(head) and text.endswith(turns.format(think=think)), text
        middle = text[len(head):-len(turns.format(think=think))]
        if instructions is None:
            assert middle.startswith(SMOLLM3_THINK) and middle.endswith("conclusion.\n\n")
        else:
            assert middle == instructions
        assert fam._trained_pieces(enc, tok) == ["4<|im_end|>", "6<|im_end|>"]
        ends = [j for j, lab in enumerate(enc.labels)
                if lab != data.IGNORE and (j + 1 == len(enc.labels) or enc.labels[j + 1] == data.IGNORE)]
        assert [enc.input_ids[j] for j in ends] == [eot, eot]
        question = conversation[:-3]  # the system turn (if any) and the first question
        prompt = generate.format_prompt(tok, question)
        first_trained = next(j for j, lab in enumerate(enc.labels) if lab != data.IGNORE)
        assert prompt == enc.input_ids[:first_trained] == data.prompt_ids(tok, question)
    assert eot in generate.stop_token_ids(None, tok)
