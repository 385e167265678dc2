"""4-bit and 8-bit bases with bitsandbytes (core.quant), on the CPU: which layers are replaced, how
close the quantised model stays, the dense weights back, loading a checkpoint in 4 bits, checkpoints
quantised some other way, the memory estimate, and ``--quantize`` from the command line to the
loaded model."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import TOKENIZER_VOCAB, tiny_gpt2, tiny_llama, tiny_tokenizer, token_batch

from core import models, quant
from core.config import ModelConfig, RunConfig
from core.errors import StudioError

NF4_REL_TOL = 0.2
"""Relative error (Frobenius) of a tiny model's logits after nf4: NF4 keeps 16 levels per 64-weight
block, ~9% RMS error per Gaussian weight (measured 0.092 here), and
the logits come out 0.08-0.09 off. Two different random models differ by 1.4, so the check
separates 'close' from 'broken'."""
INT8_REL_TOL = 0.03
"""The same for int8 (one scale per row, 255 levels; bf16 products): measured 0.010."""


WIDE = dict(hidden_size=64, intermediate_size=128)
"""Tiny models with input widths that are multiples of 64: bitsandbytes' CPU kernel de-quantises
narrower rows wrongly, which core.quant refuses (tested below); real models are all this wide."""


def _llama(seed: int = 0, **overrides):
    return tiny_llama(seed, **{**WIDE, **overrides})


def _checkpoint(folder):
    """A tiny Llama checkpoint folder (config, safetensors, the conftest tokenizer), 64 wide."""
    model = _llama(vocab_size=TOKENIZER_VOCAB)
    tok = tiny_tokenizer()
    model.config.eos_token_id, model.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# -- quantize_model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method, layer_type, tol", [("nf4", "Linear4bit", NF4_REL_TOL),
                                                      ("int8", "Linear8bitLt", INT8_REL_TOL)])
def test_quantize_model_replaces_the_linear_layers_but_the_head_and_stays_close(method, layer_type, tol):
    model = _llama().to(torch.bfloat16)
    ids = token_batch()
    before = _logits(model, ids)
    embed = model.model.embed_tokens.weight
    names = quant.quantize_model(model, method, torch.bfloat16)
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [n.split(".")[-1] for n in names] == leaves * 2
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer).__name__ == layer_type and quant.is_quantized_layer(layer)
        assert not any(p.requires_grad for p in layer.parameters())
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight is embed  # embeddings untouched
    assert quant.quantization_of(model) == method and quant.quantization_of(_llama()) == "none"
    assert getattr(model, f"is_loaded_in_{'4' if method == 'nf4' else '8'}bit")  # what PEFT reads
    after = _logits(model, ids)
    other = _logits(_llama(seed=1).to(torch.bfloat16), ids)
    assert _rel(after, before) < tol < _rel(other, before)


def test_gpt2_conv1d_layers_are_quantised_transposed_and_its_fingerprint_shapes_stay():
    model = tiny_gpt2(n_embd=64)
    ids = token_batch()
    before, shapes = _logits(model, ids), models.fingerprint(model)["shapes"]
    names = quant.quantize_model(model, "nf4", torch.float32)
    assert [n.split(".")[-1] for n in names] == ["c_attn", "c_proj", "c_fc", "c_proj"] * 2
    assert _rel(_logits(model, ids), before) < NF4_REL_TOL
    assert models.fingerprint(model)["shapes"] == shapes  # an adapter trained on it fits the full model


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dequantized_weight_is_what_the_layer_computes_with(method):
    """x·Wᵀ + b with W from dequantized_weight equals the layer's own output (fp32 products:
    exactly for nf4 and for int8 in training, where bitsandbytes' CPU path de-quantises the same
    way); int8 in eval mode also quantises x (LLM.int8()), so there the two agree to ~1%."""
    model = _llama()
    quant.quantize_model(model, method, torch.float32)
    layer = model.model.layers[0].mlp.gate_proj
    x = torch.randn(2, 5, layer.in_features)
    w = quant.dequantized_weight(layer, torch.float32)
    assert w.shape == (layer.out_features, layer.in_features) and w.dtype == torch.float32
    layer.train()
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-6, atol=1e-6)
    original = _llama().model.layers[0].mlp.gate_proj.weight
    assert _rel(w, original) < (0.15 if method == "nf4" else 0.01)  # and it is the quantised original
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert _rel(y, x @ w.t()) < (1e-6 if method == "nf4" else 0.02)


def test_an_eval_forward_does_not_repack_a_4bit_layer_or_cut_its_input_gradient():
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad forward
    in eval mode (on CPUs with AVX-512 BF16), rounding its scales and leaving a layout whose later
    training forward gives the input no gradient; core.quant turns that off."""
    model = _llama().to(torch.bfloat16)
    quant.quantize_model(model, "nf4", torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    layer.train()
    y0 = layer(x)
    (g0,) = torch.autograd.grad(y0.float().sum(), x)
    layer.eval()
    with torch.no_grad():
        layer(x.detach())
    layer.train()
    y1 = layer(x)
    (g1,) = torch.autograd.grad(y1.float().sum(), x)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)


def test_nf4_on_the_cpu_refuses_layers_narrower_than_its_blocks(tmp_path):
    """A model with 32-wide inputs: bitsandbytes' CPU kernel would compute its nf4 layers from wrong
    weights (40% error measured), so nf4 is refused, before anything is replaced or read; int8 is fine."""
    model = tiny_llama()
    with pytest.raises(StudioError, match="not a multiple of 64") as e:
        quant.quantize_model(model, "nf4", torch.float32)
    assert "int8" in e.value.hint and quant.quantization_of(model) == "none"
    assert quant.quantize_model(model, "int8", torch.float32)


# -- loading ------------------------------------------------------------------------------------------

def test_load_model_in_nf4_on_a_tiny_checkpoint(tmp_path):
    folder = _checkpoint(tmp_path / "ck")
    full = models.load_model(str(folder), device="cpu", precision="bf16")
    lm = models.load_model(str(folder), device="cpu", precision="bf16", quantize="nf4")
    assert lm.quantize == "nf4" and full.quantize == "none" and lm.dtype == torch.bfloat16
    layers = [m for m in lm.model.modules() if quant.is_quantized_layer(m)]
    assert len(layers) == 14 and all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert all(not p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    ids = token_batch(vocab=256)
    assert _rel(_logits(lm.model, ids), _logits(full.model, ids)) < NF4_REL_TOL
    assert models.fingerprint(lm.model)["shapes"] == models.fingerprint(full.model)["shapes"]
    # the same layers, quantised the same way, as quantize_model makes them
    quant.quantize_model(full.model, "nf4", torch.bfloat16)
    torch.testing.assert_close(_logits(lm.model, ids), _logits(full.model, ids), rtol=0, atol=0)


def test_a_bitsandbytes_checkpoint_loads_as_stored(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _checkpoint(tmp_path / "ck")
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                  quantization_config=quant.bnb_config("nf4", torch.bfloat16))
    stored.save_pretrained(tmp_path / "ck-nf4")
    tiny_tokenizer().save_pretrained(tmp_path / "ck-nf4")
    lm = models.load_model(str(tmp_path / "ck-nf4"), device="cpu", precision="fp32")
    assert lm.quantize == "nf4"
    assert all(m.compute_dtype == torch.float32 for m in lm.model.modules() if quant.is_quantized_layer(m))
    with pytest.raises(StudioError, match="already quantised to nf4") as e:
        models.load_model(str(tmp_path / "ck-nf4"), device="cpu", quantize="int8")
    assert "--quantize nf4" in e.value.hint


@pytest.mark.parametrize("method", ["gptq", "fp8", "awq", "compressed-tensors"])
def test_a_checkpoint_quantised_another_way_is_refused_before_any_weight_is_read(tmp_path, method, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = _checkpoint(tmp_path / "ck")
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(raw))

    def no_weights(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    for call in (lambda: models.load_model(str(folder), device="cpu"),
                 lambda: models.load_model(str(folder), device="cpu", quantize="nf4"),
                 lambda: models.summary(str(folder))):
        with pytest.raises(StudioError) as e:
            call()
        text = str(e.value)
        assert f"quantised with {method}" in text and str(folder) in text and "\n" not in text


def test_quantize_option_is_validated_and_bitsandbytes_missing_says_how_to_install(monkeypatch):
    assert "--quantize: 'bogus' is not one of none, nf4, int8" in RunConfig(model=ModelConfig(quantize="bogus")).problems()
    assert RunConfig(model=ModelConfig(quantize="nf4")).problems() == []
    with pytest.raises(StudioError, match="'q4' is not one of none, nf4, int8"):
        models.load_model("default", quantize="q4")
    monkeypatch.delitem(__import__("sys").modules, "bitsandbytes")
    monkeypatch.setattr(quant.importlib.util, "find_spec", lambda name, *a: None)
    assert not quant.available()
    with pytest.raises(StudioError) as e:
        quant.bnb("nf4")
    assert str(e.value).startswith("--quantize nf4: bitsandbytes is not installed") and "pip install" in e.value.hint


# -- the memory estimate ------------------------------------------------------------------------------

def _stored_bytes(model) -> int:
    """What the loaded model's tensors hold: parameters (packed 4-bit bytes as stored), buffers, and
    bitsandbytes' quantisation constants (absmax, the second-level state, int8 scales)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            add(qs.absmax)
            if qs.nested:
                add(qs.state2.absmax)
        for holder in (getattr(m, "state", None), getattr(m, "weight", None)):
            add(getattr(holder, "SCB", None))
    return total


@pytest.mark.parametrize("method", ["none", "nf4", "int8"])
def test_the_memory_estimate_counts_quantised_weights_as_stored(method):
    model = _llama(hidden_size=256, intermediate_size=512).to(torch.bfloat16)
    quant.quantize_model(model, method, torch.bfloat16)
    est = models.estimate_memory(model.config, batch_size=1, seq_len=8, rank=4, precision="bf16", quantize=method)
    assert est["quantize"] == method
    assert est["weights"] == pytest.approx(_stored_bytes(model), rel=0.01)


# -- the command line reaches the loaded model --------------------------------------------------------

def test_cli_train_with_quantize_nf4_trains_on_a_4bit_base(tmp_path, monkeypatch):
    from studio.cli import run as cli

    seen = []
    real = models.load_model

    def spy(*a, **k):
        lm = real(*a, **k)
        seen.append((k.get("quantize"), lm.quantize, sum(quant.is_quantized_layer(m) for m in lm.model.modules())))
        return lm

    monkeypatch.setattr(models, "load_model", spy)
    ck = _checkpoint(tmp_path / "ck")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": f"{i + 1}"}) + "\n"
                            for i in range(12)))
    out = tmp_path / "run"
    code = cli(["train", "--model", str(ck), "--data", str(data), "--device", "cpu", "--precision", "bf16",
                "--quantize", "nf4", "--max-length", "32", "--rank", "4", "--steps", "2", "--batch-size", "4",
                "--save-every", "0", "--no-progress", "--out", str(out)])
    assert code == 0
    assert seen == [("nf4", "nf4", 14)]
    assert json.loads((out / "config.json").read_text())["model"]["quantize"] == "nf4"
    studio = json.loads((out / "adapter" / "studio.json").read_text())
    assert studio["base_model"]["quantization"] == "nf4"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


# -- the window ---------------------------------------------------------------------------------------

def _window(qtbot, source: str):
    from studio.app import MainWindow

    w = MainWindow(background=False)
    qtbot.addWidget(w)
    w.state.config.model.source = source
    w.show()
    with qtbot.waitSignal(w.state.tokenizer_changed, timeout=60_000, check_params_cb=lambda t: t is not None):
        w.state.refresh_model_info()
    return w


def test_model_page_quantize_reaches_the_estimate_the_load_and_the_settings(qtbot, tmp_path, monkeypatch):
    ck = _checkpoint(tmp_path / "ck")
    w = _window(qtbot, str(ck))
    page = w.page("model")
    page.precision.setCurrentText("bf16")
    qtbot.waitUntil(lambda: page.memory is not None and page.memory["precision"] == "bf16", timeout=60_000)
    full = page.memory["weights"]
    page.quantize.setCurrentIndex(page.quantize.findData("nf4"))
    assert page.quantize.isEnabled() and page.quantize.currentText() == "nf4 (4-bit)"
    assert w.state.config.model.quantize == "nf4"
    qtbot.waitUntil(lambda: page.memory is not None and page.memory["quantize"] == "nf4", timeout=60_000)
    assert page.memory["weights"] < full and "linear layers nf4" in page.memory_note.text()
    with qtbot.waitSignal(w.state.loaded_changed, timeout=60_000):
        page.load_model()
    assert w.state.loaded.quantize == "nf4" and "nf4" in page.progress_label.text()
    w.close()

    again = _window(qtbot, str(ck))  # the choice is remembered
    assert again.state.config.model.quantize == "nf4" and again.page("model").quantize.currentData() == "nf4"
    again.close()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    without = _window(qtbot, str(ck))
    combo = without.page("model").quantize
    assert not combo.isEnabled() and "pip install" in combo.toolTip() and combo.currentData() == "none"
    assert without.state.config.model.quantize == "none"
    without.close()
