"""Adapters on disk, checked against PEFT both ways on tiny Llama- and GPT-2-style models."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file, save_file

from core import adapter, lora, targets
from core.errors import StudioError

import peft

ATOL = 1e-5


def _base(arch):
    return tiny_llama() if arch == "llama" else tiny_gpt2()


def _randomise(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ours(base, spec="all-linear", rank=4, alpha=8, rslora=False):
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    lora.inject_adapter(model, targets.resolve_targets(model, spec), rank=rank, alpha=alpha, rslora=rslora)
    _randomise(model)
    return model


def _peft_model(base, arch, **cfg):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(fan_in_fan_out=arch == "gpt2", **cfg))
    g = torch.Generator().manual_seed(11)
    for k, p in model.named_parameters():
        if "lora_" in k:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _peft_load(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def _untouched(model, before):
    assert not list(lora.lora_layers(model))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


LEAVES = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
          "gpt2": ["c_attn", "c_proj", "c_fc"]}


# -- ours → PEFT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft_with_the_same_logits(arch, rslora, tmp_path):
    base = _base(arch)
    ours = _ours(base, rslora=rslora)
    x = token_batch()
    adapter.save_adapter(ours, tmp_path / "ad", base_model="tiny")
    theirs = _peft_load(base, tmp_path / "ad")
    torch.testing.assert_close(theirs(x).logits, ours(x).logits, atol=ATOL, rtol=ATOL)
    # and it reads back into a fresh copy of the base with the same logits
    again = copy.deepcopy(base)
    adapter.load_adapter(again, tmp_path / "ad")
    torch.testing.assert_close(again(x).logits, ours(x).logits, atol=ATOL, rtol=ATOL)


def test_saved_files_are_peft_shaped(llama, tmp_path):
    ours = _ours(llama, "attention-qv")
    adapter.save_adapter(ours, tmp_path / "ad", base_model="default",
                         studio={"dataset": {"path": "d.jsonl"}, "loss_curve": [[1, 2.0]]})
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    probe = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_dict()
    missing = set(probe) - set(cfg) - {"peft_version"}
    assert not missing, f"keys PEFT writes that we do not: {missing}"
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == adapter.DEFAULT_MODEL_ID
    keys = set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2
    info = json.loads((tmp_path / "ad" / "studio.json").read_text())
    assert info["format_version"] == adapter.FORMAT_VERSION and info["base_model"]["spec"] == "default"
    assert info["dataset"] == {"path": "d.jsonl"} and info["loss_curve"] == [[1, 2.0]]
    assert info["created"] and info["trainable_parameters"] == targets.budget(
        llama, targets.resolve_targets(llama, "attention-qv"), 4).trainable
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_gpt2_partial_suffix_writes_full_names(gpt2, tmp_path):
    # only attn.c_proj, not mlp.c_proj: the suffix "c_proj" would select both in PEFT
    names = [n for n in targets.resolve_targets(gpt2, "attention") if n.endswith("attn.c_proj")]
    model = copy.deepcopy(gpt2)
    lora.inject_adapter(model, names, rank=2, alpha=4)
    _randomise(model)
    adapter.save_adapter(model, tmp_path / "ad", base_model="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(names) and cfg["fan_in_fan_out"] is True
    x = token_batch()
    torch.testing.assert_close(_peft_load(gpt2, tmp_path / "ad")(x).logits, model(x).logits, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_per_module_rank_and_alpha_round_trip_through_peft(llama, tmp_path, rslora):
    model = copy.deepcopy(llama)
    q = targets.resolve_targets(model, "q_proj")
    v = targets.resolve_targets(model, "v_proj")
    lora.inject_adapter(model, q + v[:1], rank=4, alpha=8, rslora=rslora)
    lora.inject_adapter(model, v[1:], rank=2, alpha=3, rslora=rslora)  # one module with its own r and alpha
    _randomise(model)
    adapter.save_adapter(model, tmp_path / "ad", base_model="tiny")
    files = adapter.read_adapter(tmp_path / "ad")
    assert files.rank == 4 and files.ranks == {v[1]: 2} and files.alphas == {v[1]: 3.0}
    x = token_batch()
    torch.testing.assert_close(_peft_load(llama, tmp_path / "ad")(x).logits, model(x).logits, atol=ATOL, rtol=ATOL)


# -- PEFT → ours --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_into_ours_with_the_same_logits(arch, rslora, tmp_path):
    base = _base(arch)
    theirs = _peft_model(base, arch, r=4, lora_alpha=16, use_rslora=rslora, target_modules=LEAVES[arch])
    theirs.save_pretrained(tmp_path / "peft")
    x = token_batch()
    ours = copy.deepcopy(base)
    files = adapter.load_adapter(ours, tmp_path / "peft")
    assert files.rslora is rslora and files.studio == {}
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=ATOL, rtol=ATOL)


def test_peft_rank_and_alpha_patterns_load(llama, tmp_path):
    theirs = _peft_model(llama, "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 5})
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(llama)
    files = adapter.load_adapter(ours, tmp_path / "peft")
    assert files.ranks == {"model.layers.1.self_attn.q_proj": 2}
    assert set(files.alphas) == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"}
    x = token_batch()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("variant", ["with-name", "no-prefix"])
def test_key_variants_peft_has_used(llama, tmp_path, variant):
    theirs = _peft_model(llama, "llama", r=2, lora_alpha=4, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(path)
    if variant == "with-name":  # as model.state_dict() names them
        tensors = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    else:
        tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    save_file(tensors, path)
    ours = copy.deepcopy(llama)
    adapter.load_adapter(ours, tmp_path / "ad")
    x = token_batch()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=ATOL, rtol=ATOL)


# -- refusals -----------------------------------------------------------------------------------------

def _refused(model, folder, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    with pytest.raises(StudioError, match=match) as e:
        adapter.load_adapter(model, folder)
    assert str(folder) in str(e.value) or "module" in str(e.value)
    _untouched(model, before)
    assert torch.equal(torch.random.get_rng_state(), state)
    return str(e.value)


def test_dora_is_refused(llama, tmp_path):
    _peft_model(llama, "llama", r=2, target_modules=["q_proj"], use_dora=True).save_pretrained(tmp_path / "dora")
    msg = _refused(copy.deepcopy(llama), tmp_path / "dora", "DoRA")
    assert "merge_and_unload" in msg


def test_modules_to_save_is_refused(llama, tmp_path):
    _peft_model(llama, "llama", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]).save_pretrained(
        tmp_path / "mts")
    _refused(copy.deepcopy(llama), tmp_path / "mts", "modules_to_save")


def test_pickled_weights_are_never_opened(llama, tmp_path):
    theirs = _peft_model(llama, "llama", r=2, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    _refused(copy.deepcopy(llama), tmp_path / "bin", "pickle")


@pytest.mark.parametrize("edit,match", [
    ({"bias": "all"}, "biases"),
    ({"peft_type": "IA3"}, "not LoRA"),
    ({"init_lora_weights": "pissa"}, "rewrite the base"),
    ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
    ({"r": 8}, "says r=8"),
    ({"target_modules": ["k_proj"]}, "does not select"),
    ({"some_future_option": {"x": 1}}, "does not know"),
])
def test_config_options_we_cannot_represent_are_refused(llama, tmp_path, edit, match):
    _peft_model(llama, "llama", r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(edit)
    path.write_text(json.dumps(cfg))
    _refused(copy.deepcopy(llama), tmp_path / "ad", match)


def test_missing_and_extra_tensors_are_refused(llama, tmp_path):
    _peft_model(llama, "llama", r=2, target_modules=["q_proj"]).save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    good = load_file(path)
    lone = {k: v for k, v in good.items() if not k.endswith("layers.1.self_attn.q_proj.lora_B.weight")}
    save_file(lone, path)
    _refused(copy.deepcopy(llama), tmp_path / "ad", r"layers\.1\.self_attn\.q_proj' has lora_A but no lora_B")
    save_file({**good, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}, path)
    _refused(copy.deepcopy(llama), tmp_path / "ad", "lora_magnitude_vector")


def test_wrong_shapes_name_the_first_mismatch_before_touching_the_model(tmp_path):
    wide = _ours(tiny_llama(hidden_size=48, intermediate_size=64, num_attention_heads=4), "attention-qv")
    adapter.save_adapter(wide, tmp_path / "wide", base_model="tiny")
    msg = _refused(tiny_llama(), tmp_path / "wide", "does not fit")
    assert "model.layers.0.self_attn.q_proj" in msg and "32 × 32" in msg and "48 × 48" in msg
    assert "and 3 more" in msg


def test_a_module_the_model_lacks_is_named(tmp_path):
    adapter.save_adapter(_ours(tiny_gpt2(), "attention-qv"), tmp_path / "g", base_model="tiny")
    _refused(tiny_llama(), tmp_path / "g", r"module 'transformer\.h\.0\.attn\.c_attn' is not in this model")


def test_not_an_adapter_folder(tmp_path, llama):
    with pytest.raises(StudioError, match="no such folder"):
        adapter.read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="no adapter_config.json"):
        adapter.read_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{ not json")
    with pytest.raises(StudioError, match="not valid JSON"):
        adapter.read_adapter(tmp_path / "empty")


# -- loading behaviour --------------------------------------------------------------------------------

def test_load_inactive_then_activate_and_name_clash(llama, tmp_path):
    ours = _ours(llama, "attention")
    adapter.save_adapter(ours, tmp_path / "ad", base_model="tiny")
    model = copy.deepcopy(llama)
    x = token_batch()
    adapter.load_adapter(model, tmp_path / "ad", "task", activate=False)
    torch.testing.assert_close(model(x).logits, llama(x).logits, atol=0, rtol=0)
    lora.set_active_adapters(model, ["task"])
    torch.testing.assert_close(model(x).logits, ours(x).logits, atol=ATOL, rtol=ATOL)
    with pytest.raises(StudioError, match="already has an adapter named 'task'"):
        adapter.load_adapter(model, tmp_path / "ad", "task")
    # a second adapter on the same layers, merged or not, keeps working
    adapter.load_adapter(model, tmp_path / "ad", "again", activate=False)
    lora.merge_adapter(model, "task")
    torch.testing.assert_close(model(x).logits, ours(x).logits, atol=ATOL, rtol=ATOL)


def test_fingerprint_is_saved_and_a_different_base_warns(tmp_path):
    base = tiny_llama(seed=0)
    adapter.save_adapter(_ours(base, "attention-qv"), tmp_path / "ad", base_model="tiny")
    files = adapter.read_adapter(tmp_path / "ad")
    assert files.studio.get("fingerprint"), "save_adapter must record the base model's fingerprint"
    assert adapter.fingerprint_warning(files, base) is None
    warning = adapter.fingerprint_warning(files, tiny_llama(seed=1))
    assert warning and "different weights" in warning
    assert adapter.check_compatible(files, tiny_llama(seed=1)) == []


def test_rewriting_a_read_adapter_keeps_its_facts(llama, tmp_path):
    adapter.save_adapter(_ours(llama, "attention-qv"), tmp_path / "one", base_model="default",
                         studio={"dataset": {"path": "d.jsonl"}, "training": {"steps": 3}})
    files = adapter.read_adapter(tmp_path / "one")
    adapter.write_adapter(files, tmp_path / "two", studio={"name": "copy"})
    again = adapter.read_adapter(tmp_path / "two")
    assert again.studio["dataset"] == {"path": "d.jsonl"} and again.studio["training"] == {"steps": 3}
    assert again.studio["name"] == "copy" and again.studio["created"] == files.studio["created"]
    assert again.base_model == "default" and again.config["target_modules"] == sorted(files.targets)
    for m in files.targets:
        assert all(torch.equal(x, y) for x, y in zip(files.tensors[m], again.tensors[m]))


def test_names_one_prefix_apart_are_aligned(llama, tmp_path):
    """An adapter of the bare transformer (PEFT over AutoModel) fits the causal LM, and back."""
    x = token_batch()
    ours = _ours(llama, "attention")
    adapter.save_adapter(ours, tmp_path / "lm", base_model="tiny")
    bare = copy.deepcopy(llama).model  # LlamaModel: names without the "model." prefix
    files = adapter.load_adapter(bare, tmp_path / "lm")
    assert "layers.0.self_attn.q_proj" in files.targets and not any(t.startswith("model.") for t in files.targets)
    torch.testing.assert_close(bare(x).last_hidden_state, ours.model(x).last_hidden_state, atol=ATOL, rtol=ATOL)
    adapter.save_adapter(bare, tmp_path / "bare", base_model="tiny")
    lm = copy.deepcopy(llama)
    adapter.load_adapter(lm, tmp_path / "bare")
    torch.testing.assert_close(lm(x).logits, ours(x).logits, atol=ATOL, rtol=ATOL)


def test_a_failure_half_way_leaves_the_model_as_it_was(llama, tmp_path, monkeypatch):
    adapter.save_adapter(_ours(llama, "attention"), tmp_path / "ad", base_model="tiny")
    model = copy.deepcopy(llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = lora.LoRALinear.set_adapter_weights

    def fail_on_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk went away")
        return real(self, *args)

    monkeypatch.setattr(lora.LoRALinear, "set_adapter_weights", fail_on_third)
    with pytest.raises(RuntimeError, match="disk went away"):
        adapter.load_adapter(model, tmp_path / "ad")
    _untouched(model, before)


def test_half_precision_files_load(llama, tmp_path):
    theirs = _peft_model(llama, "llama", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    theirs.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)
    model = copy.deepcopy(llama)
    files = adapter.load_adapter(model, tmp_path / "ad")
    assert files.tensors[files.targets[0]][0].dtype == torch.bfloat16
    layer = dict(lora.lora_layers(model))[files.targets[0]]
    assert layer.lora_A["default"].dtype == torch.float32  # trained and applied in fp32
    torch.testing.assert_close(layer.lora_A["default"], files.tensors[files.targets[0]][0].float())


def test_loaded_adapters_are_frozen_unless_trainable(llama, tmp_path):
    adapter.save_adapter(_ours(llama, "attention-qv"), tmp_path / "ad", base_model="tiny")
    model = copy.deepcopy(llama).requires_grad_(False)
    adapter.load_adapter(model, tmp_path / "ad")
    assert not any(p.requires_grad for p in model.parameters())
    adapter.load_adapter(model, tmp_path / "ad", "task", trainable=True)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.lora_parameters(model, ["task"]))
    assert all(".lora_A.task" in k or ".lora_B.task" in k for k in trainable)
