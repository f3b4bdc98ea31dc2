import pytest
import torch

import labkit
from labkit import adapters as AD
from labkit import freqmole as FM


def _x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)


def _perturb(transformer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["freqmole", "lora"])
def test_noop_at_init_and_only_adapters_train(kind):
    bb = labkit.load("tiny")
    x, c = _x()
    before = bb(x, 0.5, [c])
    AD.inject(bb.transformer, kind, rank=4)
    assert torch.allclose(bb(x, 0.5, [c]), before, atol=1e-6)
    names = [n for n, p in bb.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # every double- and single-stream block is adapted; the final proj_out is not
    adapted = {n.split(".lora_")[0] for n in names}
    assert any(n.startswith("single_transformer_blocks.1.proj_out") for n in adapted)
    assert "proj_out" not in adapted
    v = bb(x, 0.5, [c])
    v.pow(2).mean().backward()
    grads = [n for n, p in bb.transformer.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def test_alpha_prior_decreases_with_depth():
    bb = labkit.load("tiny")
    AD.inject(bb.transformer, "freqmole", rank=4, prior=dict(high=0.9, low=0.1))
    a = list(FM.alpha_by_block(bb.transformer).values())
    assert a[0] == pytest.approx(0.9) and a[-1] == pytest.approx(0.1) and all(x >= y for x, y in zip(a, a[1:]))
    # (freezing α at a step is a learning-rate schedule of the loop:
    # tests/test_train.py::test_alpha_freezing_survives_resume)


def test_save_load_roundtrip_and_merge(tmp_path):
    bb = labkit.load("tiny")
    spec = AD.inject(bb.transformer, "freqmole", rank=4)
    _perturb(bb.transformer)
    x, c = _x()
    out = bb(x, 0.5, [c])
    AD.save(bb.transformer, spec, tmp_path)
    fresh = labkit.load("tiny")
    assert not torch.allclose(fresh(x, 0.5, [c]), out)
    AD.load(fresh.transformer, tmp_path)
    assert torch.allclose(fresh(x, 0.5, [c]), out, atol=1e-6)
    AD.merge(fresh.transformer)
    assert torch.allclose(fresh(x, 0.5, [c]), out, atol=1e-5)


def test_freqmole_file_into_lora_modules_is_an_error(tmp_path):
    bb = labkit.load("tiny")
    spec = AD.inject(bb.transformer, "freqmole", rank=4)
    AD.save(bb.transformer, dict(spec, kind="lora"), tmp_path)  # a config that lost the custom module
    with pytest.raises(ValueError, match="disagree"):
        AD.load(labkit.load("tiny").transformer, tmp_path)


def test_equal_parameter_baseline():
    a, b = labkit.load("tiny"), labkit.load("tiny")
    AD.inject(a.transformer, "freqmole", rank=4)
    AD.inject(b.transformer, "lora", rank=8)  # two rank-4 experts ≈ one rank-8 LoRA
    na, nb = AD.trainable_count(a.transformer), AD.trainable_count(b.transformer)
    assert abs(na - nb) / nb < 0.01  # only the α scalars differ
