"""ΔW analysis checked against a dense torch.linalg.svd of the same matrices."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from core import adapter, analysis, lora, targets
from core.adapter import AdapterFiles
from core.errors import StudioError


def _trained(base, spec="all-linear", rank=4, alpha=8, seed=1):
    model = copy.deepcopy(base)
    lora.inject_adapter(model, targets.resolve_targets(model, spec), rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, adapter.adapter_from_model(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_figures_equal_a_dense_svd(arch):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    model, ad = _trained(base)
    result = analysis.analyse(ad, model)
    json.dumps(result)  # plain data all the way down
    weights = {n: m for n, m in base.named_modules()}
    for row in result["modules"]:
        m = row["module"]
        dense = ad.delta(m).double()
        u, s, vh = torch.linalg.svd(dense)
        r = row["rank"]
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), s[:r],
                                   atol=1e-5, rtol=1e-4)
        assert row["frobenius"] == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-5)
        energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert row["effective_rank"] == int((energy < 0.9).sum()) + 1
        w0 = weights[m].weight.detach().double()
        w0 = w0 if isinstance(weights[m], torch.nn.Linear) else w0.t()
        proj = torch.linalg.norm(u[:, :r].t() @ w0 @ vh[:r].t())
        assert row["projection_norm"] == pytest.approx(float(proj), rel=1e-4)
        assert row["amplification"] == pytest.approx(float(torch.linalg.norm(dense) / proj), rel=1e-4)
    assert result["summary"]["modules"] == len(ad.targets)
    assert result["summary"]["mean_amplification"] > 0


def test_merged_adapter_does_not_change_the_base_weight_used(llama):
    model, ad = _trained(llama, "attention-qv")
    before = analysis.analyse(ad, model)
    lora.merge_adapter(model)
    after = analysis.analyse(ad, model)
    for x, y in zip(before["modules"], after["modules"]):
        assert y["amplification"] == pytest.approx(x["amplification"], rel=1e-4)
    plain = analysis.analyse(ad, llama)
    for x, y in zip(before["modules"], plain["modules"]):
        assert y["amplification"] == pytest.approx(x["amplification"], rel=1e-4)


def test_without_a_model_there_is_no_amplification(llama, tmp_path):
    model, _ = _trained(llama, "attention-qv")
    adapter.save_adapter(model, tmp_path / "ad", base_model="tiny")
    result = analysis.analyse(tmp_path / "ad")
    assert all(m["amplification"] is None for m in result["modules"])
    assert result["summary"]["mean_amplification"] is None


def test_effective_rank_counts_energy():
    assert analysis.effective_rank([3.0, 1.0, 0.0]) == 1  # 9 / 10 = 0.9 exactly: one is enough
    assert analysis.effective_rank([1.0, 1.0, 1.0, 1.0]) == 4
    assert analysis.effective_rank([0.0, 0.0]) == 0
    assert analysis.effective_rank([1.0, 1.0], energy=0.5) == 1
    # a rank-8 adapter whose B·A is rank 1 has effective rank 1
    a = torch.randn(8, 40)
    b = torch.outer(torch.randn(30), torch.ones(8))
    ad = AdapterFiles(folder=None, config={}, rank=8, alpha=8, rslora=False, dropout=0.0,
                      targets=["m"], tensors={"m": (a, b)})
    assert analysis.analyse(ad)["modules"][0]["effective_rank"] == 1


@pytest.mark.parametrize("using", ["A", "delta"])
def test_subspace_similarity_with_itself_is_one(llama, using):
    _, ad = _trained(llama, "attention-qv")
    same = analysis.subspace_similarity(ad, ad, using=using)
    assert same["mean"] == pytest.approx(1.0, abs=1e-5)
    grid = analysis.similarity_grid(ad, ad, ad.targets[0], using=using)
    for i, row in enumerate(grid):
        for j, phi in enumerate(row):
            assert phi == pytest.approx(1.0, abs=1e-5)  # min(i, j) directions of one are in the other


def test_subspace_similarity_equals_its_definition(llama):
    _, one = _trained(llama, "attention-qv", rank=8, seed=1)
    _, two = _trained(llama, "attention-qv", rank=4, seed=2)
    m = one.targets[0]
    u1 = torch.linalg.svd(one.tensors[m][0].double(), full_matrices=False)[2].t()
    u2 = torch.linalg.svd(two.tensors[m][0].double(), full_matrices=False)[2].t()
    for i, j in ((1, 1), (3, 2), (8, 4)):
        want = float(torch.linalg.norm(u1[:, :i].t() @ u2[:, :j]) ** 2 / min(i, j))
        got = analysis.subspace_similarity(one, two, i, j)["modules"][m]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert 0 <= got <= 1
    # two random adapters in 32 dimensions share little: φ(1,1) is small on average
    assert analysis.subspace_similarity(one, two, 1, 1)["mean"] < 0.5


def test_fast_on_a_wide_matrix():
    """49152 × 4096 at r = 16 without forming the 800 MB dense ΔW."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 49152, generator=g), torch.randn(4096, 16, generator=g)
    ad = AdapterFiles(folder=None, config={}, rank=16, alpha=32, rslora=False, dropout=0.0,
                      targets=["wide"], tensors={"wide": (a, b)})
    row = analysis.analyse(ad)["modules"][0]
    assert len(row["singular_values"]) == 16
    # ‖ΔW‖_F² = trace(Aᵀ·Bᵀ·B·A)·s² = ‖B·(A·Aᵀ)^{1/2}‖², checked through the small Gram matrices
    gram = (b.double().t() @ b.double()) @ (a.double() @ a.double().t())
    assert row["frobenius"] == pytest.approx(float(torch.trace(gram).sqrt() * 2), rel=1e-4)


def test_errors_name_the_problem(llama):
    _, ad = _trained(llama, "attention-qv")
    _, gpt = _trained(tiny_gpt2(), "attention-qv")
    with pytest.raises(StudioError, match="no module in common"):
        analysis.subspace_similarity(ad, gpt)
    with pytest.raises(StudioError, match="not in this model"):
        analysis.analyse(gpt, llama)
    with pytest.raises(StudioError, match="energy"):
        analysis.analyse(ad, energy=1.5)


# -- lora-studio inspect ------------------------------------------------------------------------------

def _inspect(capsys, *args):
    from studio import cli

    capsys.readouterr()  # drop what set-up printed (transformers' progress bars)
    code = cli.run(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def saved(checkpoint, tmp_path):
    """An adapter trained (randomly) on the tiny checkpoint folder, saved with a studio.json."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    lora.inject_adapter(model, targets.resolve_targets(model, "attention-qv"), rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path / "adapter"
    adapter.save_adapter(model, folder, base_model=str(checkpoint),
                         studio={"dataset": {"path": "data.jsonl", "rows": 12},
                                 "training": {"steps": 5, "final_loss": 1.25}, "loss_curve": [[1, 2.5], [5, 1.25]]})
    return folder


def test_inspect_prints_the_adapter_and_its_analysis(capsys, saved, checkpoint):
    code, out, err = _inspect(capsys, saved)
    assert code == 0, err
    assert "rank        4   alpha 8" in out and "4 modules: q_proj, v_proj" in out
    assert str(checkpoint) in out and "LlamaForCausalLM" in out
    assert "steps 5" in out and "final_loss 1.25" in out and "2.5 → 1.25" in out
    assert "model.layers.1.self_attn.v_proj" in out and "give --model" in out

    code, out, err = _inspect(capsys, saved, "--model", checkpoint, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["trainable_parameters"] == 2 * 4 * ((32 + 32) + (32 + 16))
    assert 0 < info["share"] < 1 and info["studio"]["training"]["steps"] == 5
    rows = info["analysis"]["modules"]
    assert len(rows) == 4 and all(r["amplification"] > 0 for r in rows)
    assert all(len(r["singular_values"]) == 4 for r in rows)


def test_inspect_a_peft_adapter(capsys, llama, tmp_path):
    import peft
    model = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft")
    code, out, err = _inspect(capsys, tmp_path / "peft")
    assert code == 0, err
    assert "(peft format)" in out and "eff.r" in out


def test_inspect_errors_are_one_line_with_exit_1(capsys, saved, tmp_path):
    from conftest import tiny_checkpoint

    code, _, err = _inspect(capsys, tmp_path / "missing")
    assert code == 1 and "no such folder" in err and err.count("\n") == 1 and err.startswith("error: ")
    other = tiny_checkpoint(tmp_path / "gpt2", arch="gpt2")
    code, _, err = _inspect(capsys, saved, "--model", other)
    assert code == 1 and "module 'model.layers.0.self_attn.q_proj' is not in this model" in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1 and "Traceback" not in err
    config = saved / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    code, _, err = _inspect(capsys, saved)
    assert code == 1 and "DoRA" in err
    code, _, err = _inspect(capsys, saved, "--energy", "2")
    assert code == 1 and "--energy" in err


def test_inspect_compare_prints_subspace_similarity(capsys, saved):
    code, out, err = _inspect(capsys, saved, "--compare", saved, "--json")
    assert code == 0, err
    sim = json.loads(out)["similarity"]
    assert sim["top"]["mean"] == pytest.approx(1.0, abs=1e-5) and sim["full"]["mean"] == pytest.approx(1.0, abs=1e-5)
    code, out, _ = _inspect(capsys, saved, "--compare", saved)
    assert code == 0 and "subspace similarity with" in out and "φ(1,1)" in out
