"""GGUF export (core.gguf_export, core.gguf_write, core.gguf_vocab, core.gguf_lora, core.ollama):
round trips on tiny models of every supported family, the tokenizer in the file against the Hugging
Face one, the Modelfile's template against the model's chat template, refusals and cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CHATML, TOKENIZER_VOCAB, tiny_tokenizer
from core import gguf_arch, gguf_export, gguf_vocab, gguf_write, ollama
from core.errors import Cancelled, StudioError

SMALL = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _config(kind: str, **over):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig}[kind]
    cfg = dict(SMALL, head_dim=16)
    if kind == "phi3":
        cfg.pop("head_dim")
        cfg.update(pad_token_id=2, eos_token_id=1, bos_token_id=None)
    if kind.startswith("gemma"):
        cfg.update(query_pre_attn_scalar=16, pad_token_id=2, eos_token_id=1, bos_token_id=None)
    if kind == "qwen2":
        cfg.pop("head_dim")
    cfg.update(over)
    return cls(**cfg)


def make_checkpoint(folder: Path, kind: str = "llama", *, peaked: bool = False, seed: int = 0,
                    template: str | None = CHATML, **over) -> Path:
    """A tiny checkpoint of ``kind`` with the tiny ChatML tokenizer. ``peaked``: a strong tied
    embedding makes the next-token choice clear-cut (like a trained model's), so that the 4-8 bit
    checks are about the file and not about near-ties in random weights."""
    torch.manual_seed(seed)
    cfg = _config(kind, **({"tie_word_embeddings": True} if peaked else {}), **over)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") and kind.startswith("gemma"):
                p.normal_(0.0, 0.1)  # Gemma stores w and computes 1 + w: not all zeros, so the +1 is tested
        if peaked:
            model.get_input_embeddings().weight.normal_(0.0, 1.0)
        else:  # attention that matters: sharp scores (a wrong q/k layout then moves logits by ~100 %)
            for n, p in model.named_parameters():
                p.mul_(10.0 if ("q_proj" in n or "k_proj" in n or "qkv_proj" in n) else
                       3.0 if ("v_proj" in n or "o_proj" in n) else 1.0)
    tok = tiny_tokenizer(chat_template=False)
    if template:
        tok.chat_template = template
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def lora_adapter(folder: Path, ckpt: Path, targets=("q_proj", "k_proj", "v_proj", "down_proj"), r=4, seed=1) -> Path:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                   init_lora_weights=False))
    pm.save_pretrained(folder)
    return folder


def gguf_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# -- round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_f16_round_trip_of_every_family(kind, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", kind)
    report = gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "out")
    v = report["verify"]
    assert v["ok"] and v["relative"] < 5e-3, v
    assert v["tokenizer"]["same_ids"] and v["tokenizer"]["chat_template"]
    assert report["arch"] == gguf_arch.FAMILIES[kind].arch
    assert gguf_files(tmp_path / "out") == sorted([Path(report["out"]).name, "Modelfile"])
    meta = gguf_vocab.read_metadata(Path(report["out"]))
    assert meta["general.architecture"] == gguf_arch.FAMILIES[kind].arch
    assert meta["tokenizer.chat_template"] == CHATML


def test_the_check_catches_a_wrong_permutation(tmp_path, monkeypatch):
    """Without llama.cpp's q/k permutation the file computes something else; the read-back must see it
    (transformers un-permutes what it reads) and nothing may be left behind."""
    ckpt = make_checkpoint(tmp_path / "ck", "llama")
    monkeypatch.setattr(gguf_arch, "transform", lambda config, name, w: w)
    with pytest.raises(StudioError, match="GGUF check failed .*logits differ"):
        gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gemma_norms_are_stored_plus_one(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", "gemma2")
    path = tmp_path / "g.gguf"
    gguf_write.write_gguf(ckpt, path, "f16", name="g")
    from gguf import GGUFReader
    from safetensors.torch import load_file

    stored = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}
    hf = load_file(str(ckpt / "model.safetensors"))
    np.testing.assert_allclose(stored["output_norm.weight"], hf["model.norm.weight"].numpy() + 1.0, rtol=1e-6)


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0", "q5_1"])
def test_quantized_types_pass_their_checks(type_name, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", "llama", peaked=True)
    report = gguf_export.export_gguf(str(ckpt), type_name=type_name, out=tmp_path / "out")
    v = report["verify"]
    assert v["ok"]
    if type_name == "q8_0":
        assert v["prompts_same"] == v["prompts"] == 4 and v["greedy_tokens"] == 32
    else:
        assert v["top1_agreement"] >= 0.95
    f16_size = 2 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(ckpt).parameters())
    assert report["size_bytes"] < f16_size


def test_merged_adapter_round_trip_equals_base_plus_adapter(tmp_path):
    """The file holds base + adapter: its read-back model agrees with the base running the adapter
    unmerged (PEFT as the oracle), and differs from the bare base."""
    ckpt = make_checkpoint(tmp_path / "ck", "llama")
    ad = lora_adapter(tmp_path / "ad", ckpt)
    report = gguf_export.export_gguf(str(ckpt), [ad], type_name="f16", out=tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), ad).eval()
    got = gguf_write.read_back(Path(report["out"]), base.config)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 1]])
    with torch.no_grad():
        g, w, b = got(input_ids=ids).logits, with_adapter(input_ids=ids).logits, base(input_ids=ids).logits
    scale = float(w.abs().max())
    assert float((g - w).abs().max()) / scale < 1e-2
    assert float((b - w).abs().max()) / scale > 5e-2


# -- the tokenizer ---------------------------------------------------------------------------------

def test_file_tokenizer_equals_hugging_face_on_multilingual_text(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck")
    path = tmp_path / "m.gguf"
    gguf_write.write_gguf(ckpt, path, "f16", name="m")
    tok = tiny_tokenizer()
    meta = gguf_vocab.read_metadata(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    text = gguf_vocab.PROBE_TEXT + "<|im_start|>user\nhi<|im_end|>"
    assert gguf_vocab.llama_cpp_ids(meta, text) == tok.encode(text, add_special_tokens=False)
    assert gguf_vocab.check_tokenizer(path, tok)["same_ids"]


def test_pre_tokenizer_is_chosen_by_what_reproduces_the_tokenizer(tmp_path):
    """A tokenizer that splits digits one by one (SmolLM's) is not 'gpt-2' to llama.cpp."""
    from tokenizers import pre_tokenizers

    tok = tiny_tokenizer()
    assert gguf_vocab.pre_tokenizer_name(tok) == "gpt-2"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert gguf_vocab.pre_tokenizer_name(tok) in ("smollm", "starcoder")


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[aeiou]"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    with pytest.raises(StudioError, match="pre-tokenizer"):
        gguf_vocab.pre_tokenizer_name(tok)


# -- adapter alone ---------------------------------------------------------------------------------

def test_adapter_only_gguf_lora_applies_to_the_base(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", "llama")
    ad = lora_adapter(tmp_path / "ad", ckpt)
    report = gguf_export.export_gguf(str(ckpt), [ad], type_name="f16", out=tmp_path / "out", adapter_only=True)
    assert report["verify"]["relative"] < 1e-2 and report["modules"] == 8
    meta = gguf_vocab.read_metadata(Path(report["out"]))
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert "ADAPTER ./" in Path(report["modelfile"]).read_text()
    # ΔW from the file (B un-permuted) equals the adapter's, module by module
    from core import adapter as adapter_io
    from core import gguf_lora

    files = adapter_io.read_adapter(ad)
    cfg = AutoModelForCausalLM.from_pretrained(ckpt).config
    deltas = gguf_lora.read_deltas(Path(report["out"]), cfg)
    names = gguf_arch.gguf_names(cfg, [m.replace("base_model.model.", "") + ".weight" for m in files.tensors])
    for module in files.tensors:
        want = files.delta(module)
        got = deltas[names[module.replace("base_model.model.", "") + ".weight"]]
        assert float((got - want).abs().max()) <= 2e-3 * float(want.abs().max())


# -- Ollama ------------------------------------------------------------------------------------------

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
         "{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template,family,stop", [(CHATML, "chatml", "<|im_end|>"), (LLAMA3, "llama3", "<|eot_id|>"),
                                                  (GEMMA, "gemma", "<end_of_turn>"), (PHI3, "phi3", "<|end|>")])
def test_modelfile_template_renders_like_the_chat_template(template, family, stop, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", template=template)
    text = ollama.modelfile("./m.gguf", ckpt, system="Be brief.", sampling={"temperature": 0.7, "top_p": 0.9})
    fam = next(f for f in ollama.FAMILIES if f.name == family)
    assert f'TEMPLATE """{fam.go}"""' in text
    assert f'PARAMETER stop "{stop}"' in text
    assert "FROM ./m.gguf" in text and 'SYSTEM """Be brief."""' in text
    assert "PARAMETER temperature 0.7" in text and "PARAMETER top_p 0.9" in text


def test_default_system_prompt_of_the_template_goes_into_the_modelfile(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", template=SMOL)
    text = ollama.modelfile("./m.gguf", ckpt)
    assert "TEMPLATE" in text and "<|im_start|>" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text


def test_unknown_template_is_left_to_ollama_with_a_comment(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    text = ollama.modelfile("./m.gguf", ckpt)
    assert "TEMPLATE" not in text and "matched none" in text


# -- refusals and cancel -----------------------------------------------------------------------------

def test_unsupported_architecture_is_refused_before_any_work(tmp_path):
    from conftest import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(StudioError, match="'gpt2' model; the GGUF export supports"):
        gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_destination_file_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "Modelfile").write_text("mine")
    with pytest.raises(StudioError, match="Modelfile already exists"):
        gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "out")
    assert gguf_files(tmp_path / "out") == ["Modelfile"] and (tmp_path / "out" / "Modelfile").read_text() == "mine"


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck")
    other = make_checkpoint(tmp_path / "other", hidden_size=32, head_dim=8)
    ad = lora_adapter(tmp_path / "ad", other)
    for only in (False, True):
        with pytest.raises(StudioError, match="does not fit"):
            gguf_export.export_gguf(str(ckpt), [ad], type_name="f16", out=tmp_path / "out", adapter_only=only)
        assert not (tmp_path / "out").exists()


def test_too_little_disk_is_refused(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ck")
    monkeypatch.setattr(gguf_export, "free_space", lambda folder: 1000)
    with pytest.raises(StudioError, match="GiB free, the export needs about"):
        gguf_export.export_gguf(str(ckpt), type_name="q8_0", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_k_quants_without_llama_cpp_say_how_to_get_them(monkeypatch):
    monkeypatch.setattr(gguf_export, "k_quants_available", lambda: False)
    with pytest.raises(StudioError, match=r"pip install 'lora-studio\[gguf-k\]'"):
        gguf_export.check_type("q4_k_m")
    with pytest.raises(StudioError, match="not one of"):
        gguf_export.check_type("q3_x")


def test_cancel_leaves_nothing(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck")
    ad = lora_adapter(tmp_path / "ad", ckpt)
    seen = []

    def cancelled():
        return len(seen) > 0

    def progress(message, fraction):
        if "writing" in message:
            seen.append(message)  # cancel once the GGUF file is being written

    (tmp_path / "out").mkdir()
    with pytest.raises(Cancelled):
        gguf_export.export_gguf(str(ckpt), [ad], type_name="q8_0", out=tmp_path / "out", progress=progress,
                                cancelled=cancelled)
    assert seen and gguf_files(tmp_path / "out") == []


def test_unsupported_rope_scaling_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                             "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(StudioError, match="'yarn' rope scaling"):
        gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "out")


# -- SentencePiece-style tokenizers (Llama 2, Mistral, Gemma, Phi-3) ------------------------------------

def spm_tokenizer():
    """A tiny BPE tokenizer with byte fallback and ▁ for spaces, as Llama 2 / Phi-3 ship it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaTokenizerFast

    from conftest import _CORPUS

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True)
    fast.chat_template = PHI3
    return fast


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    ckpt = tmp_path / "ck"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("phi3", vocab_size=416, eos_token_id=2, pad_token_id=0)).eval()
    model.save_pretrained(ckpt)
    spm_tokenizer().save_pretrained(ckpt)
    report = gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "out")
    tok = report["verify"]["tokenizer"]
    assert tok["model"] == "llama" and tok["same_ids"] and tok["add_bos"]
    meta = gguf_vocab.read_metadata(Path(report["out"]))
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1
    assert "TEMPLATE" in Path(report["modelfile"]).read_text()  # Phi-3's template, translated


# -- the command line -----------------------------------------------------------------------------------

def test_cli_export_gguf_writes_the_file_and_the_modelfile(tmp_path, capsys):
    from studio import cli

    ckpt = make_checkpoint(tmp_path / "ck")
    ad = lora_adapter(tmp_path / "ad", ckpt)
    code = cli.run(["export-gguf", "--model", str(ckpt), "--adapter", str(ad), "--type", "f16", "--out",
                    str(tmp_path / "out"), "--name", "mine.gguf", "--system", "Be brief.", "--temperature", "0.3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verified: logits within" in out and "same" in out
    assert gguf_files(tmp_path / "out") == ["Modelfile", "mine.gguf"]
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./mine.gguf" in text and "PARAMETER temperature 0.3" in text


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from studio import cli

    ckpt = make_checkpoint(tmp_path / "ck")
    capsys.readouterr()
    assert cli.run(["export-gguf", "--model", str(ckpt), "--type", "q9", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --type q9: not one of") and "\n" not in err
    assert cli.run(["export-gguf", "--model", str(ckpt), "--adapter-only", "--out", str(tmp_path / "o")]) == 1
    assert "--adapter-only: give the adapter" in capsys.readouterr().err


# -- the window ---------------------------------------------------------------------------------------

def test_dialog_shows_size_free_space_and_how_to_get_k_quants(qtbot, tmp_path, monkeypatch):
    from studio.widgets import gguf_dialog

    monkeypatch.setattr(gguf_dialog, "k_quants_available", lambda: False)
    d = gguf_dialog.GgufExportDialog(str(tmp_path / "x"), parameters=134_515_008, adapter_parameters=2_442_240,
                                     playground={"system": "Be brief.", "temperature": 0.2, "top_p": 0.8})
    qtbot.addWidget(d)
    assert d.type.currentData() == "q8_0" and "136.3 MiB" in d.size.text() and "free" in d.size.text()
    k = d.type.findData("q4_k_m")
    assert not d.type.model().item(k).isEnabled() and "lora-studio[gguf-k]" in d.k_note.text()
    d.what.setCurrentIndex(1)  # the adapter alone: 4.7 MiB of F16
    assert "4.7 MiB" in d.size.text() and not d.type.isEnabled()
    v = d.values()
    assert v["adapter_only"] and v["system"] == "Be brief." and v["sampling"] == {"temperature": 0.2, "top_p": 0.8}


def test_library_export_gguf_runs_as_a_job_and_cancel_leaves_nothing(qtbot, tmp_path, monkeypatch):
    import pytestqt  # noqa: F401  (a missing module fails, never skips)

    from core.library import Library
    from studio.pages.library import LibraryPage
    from studio.state import StudioState
    from studio.widgets import gguf_dialog

    ckpt = make_checkpoint(tmp_path / "ck")
    Library().add_folder(lora_adapter(tmp_path / "ad", ckpt), name="mine")
    state = StudioState()
    state.config.model.source = str(ckpt)
    state.config.model.device = "cpu"
    page = LibraryPage(state)
    qtbot.addWidget(page)
    page.show()
    out = tmp_path / "gguf"
    values = {"out": str(out), "type": "f16", "adapter_only": False, "system": None,
              "sampling": {"temperature": 0.5}, "ollama_name": None}
    monkeypatch.setattr(gguf_dialog, "ask", lambda dialog: dict(values))
    qtbot.waitUntil(lambda: page.check_worker is None, timeout=30_000)
    page.select_name("mine")
    assert page.export_gguf_button.isEnabled()
    page.export_gguf_button.click()
    assert page.job is not None and page.job_row.isVisible()
    qtbot.waitUntil(lambda: page.job is None, timeout=120_000)
    assert page.last_report["verify"]["ok"] and Path(page.last_report["out"]).parent == out
    assert "PARAMETER temperature 0.5" in (out / "Modelfile").read_text()

    values["out"] = str(tmp_path / "cancelled")
    page.export_gguf_button.click()
    with qtbot.waitSignal(page.job.cancelled, timeout=60_000):
        page.job_cancel.click()
    qtbot.waitUntil(lambda: page.job is None, timeout=60_000)
    assert not (tmp_path / "cancelled").exists()
    page.shutdown()


def test_out_that_is_a_file_is_refused(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StudioError, match="a file, not a folder"):
        gguf_export.export_gguf(str(ckpt), type_name="f16", out=tmp_path / "f")
