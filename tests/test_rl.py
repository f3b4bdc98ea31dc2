"""Flow-GRPO pieces: the SDE step's log-probability, advantages, the clipped objective, SELF budgets,
and a few GRPO steps on tiny that move only the adapter."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit
from labkit import adapters as AD
from labkit import data as D
from labkit import rl
from labkit.loop import LoopConfig
from labkit.models import pack_references
from labkit.sampling import sde_mean, sde_sample, sde_std, sde_step


@pytest.mark.parametrize("t, t_next", [(1.0, 0.8), (0.6, 0.4), (0.2, 0.05)])
def test_sde_logprob_equals_independent_gaussian_density(t, t_next):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    x_next, lp, mean, std = sde_step(v, x, t, t_next, 0.7, generator=g)
    ref = torch.distributions.Normal(mean.double(), std).log_prob(x_next.double()).flatten(1).mean(1)
    assert torch.allclose(lp.double(), ref, atol=1e-5)
    # the formula itself, written out independently (Flow-GRPO's mean and std)
    s = 0.7 * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
    dt = t_next - t
    assert torch.allclose(mean, x * (1 + s * s * dt / (2 * t)) + v * (1 + s * s * (1 - t) / (2 * t)) * dt, atol=1e-6)
    assert std == pytest.approx(s * math.sqrt(-dt)) and sde_std(t, t_next, 0.7) == pytest.approx(s)


def test_sde_without_noise_is_the_euler_step():
    x, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    mean, std = sde_mean(x, v, 0.5, 0.25, noise_level=0.0)
    assert std == 0 and torch.allclose(mean, x + (0.25 - 0.5) * v)


def test_advantages_are_zero_mean_per_group():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.1, 0.1, 0.2, 0.0]])
    a = rl.group_advantages(r)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-5) and a.abs().max() <= 5
    assert torch.equal(rl.group_advantages(torch.ones(1, 4)), torch.zeros(1, 4))  # no signal in a tied group
    assert rl.group_advantages(torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 0, 0, 100]]), clamp=2.0).max() == 2.0


def test_clipped_objective_equals_unclipped_at_ratio_one():
    lp = torch.randn(8, requires_grad=True)
    adv = torch.randn(8)
    loss, logs = rl.clipped_objective(lp, lp.detach(), adv, clip_range=1e-4)
    assert torch.allclose(loss, -(adv * torch.exp(lp - lp.detach())).mean()) and logs["clipfrac"] == 0
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 8)  # the policy gradient A·∇log p
    # away from ratio 1 the clip bites: a large positive-advantage ratio gets no more credit
    loss2, logs2 = rl.clipped_objective(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    assert loss2.item() == pytest.approx(-1.2) and logs2["clipfrac"] == 1


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 4),
    sides=st.lists(st.tuples(st.integers(16, 200), st.integers(16, 200)), min_size=4, max_size=4),
    budget=st.integers(4 * 16 * 16, 300 * 300),
)
def test_pack_k_references_never_exceeds_the_budget(k, sides, budget):
    refs = [torch.zeros(3, h, w) for h, w in sides[:k]]
    out = pack_references(refs, budget)
    assert len(out) == k and sum(r.shape[-1] * r.shape[-2] for r in out) <= budget
    assert all(r.shape[-1] % 16 == 0 and r.shape[-2] % 16 == 0 for r in out)


def test_budget_schedule_is_progressive():
    cfg = rl.GRPOConfig(budgets=(0.5, 1.0, 2.0), size=64)
    b = [rl.budget_at(cfg, s, 30) for s in range(30)]
    assert b[0] == 2048 and b[-1] == 8192 and all(x <= y for x, y in zip(b, b[1:]))


def test_extra_reference_views_leave_the_triplet_unchanged():
    a, b = D.make_triplet(5, "train", 64, 2), D.make_triplet(5, "train", 64, 2, extra_refs=2)
    assert torch.equal(a.reference, b.reference) and torch.equal(a.lowres, b.lowres) and len(b.extra_refs) == 2
    assert not torch.equal(b.extra_refs[0], b.reference) and b.extra_refs[0].shape == b.reference.shape


def test_sde_sample_log_probs_score_its_own_steps(tiny):
    """The recorded log-probabilities are those of each stored step under the policy (re-scored from the
    trajectory with the model), a step's log-prob is highest at its mean, and another seed gives another path."""
    from labkit.sampling import sde_step

    z = torch.zeros(2, 16, 8, 8)
    tr = sde_sample(tiny, [z], "refine", (2, 16, 8, 8), steps=4, generator=torch.Generator().manual_seed(0))
    assert tr["latents"].shape == (5, 2, 16, 8, 8) and tr["log_probs"].shape == (3, 2)
    embeds = tiny.encode_prompt("refine", batch=2)
    ts = tr["times"].tolist()
    for i in range(3):
        x_t, x_next = tr["latents"][i], tr["latents"][i + 1]
        v = tiny(x_t, ts[i], [z], prompt_embeds=embeds)
        _, lp, mean, std = sde_step(v, x_t, ts[i], ts[i + 1], x_next=x_next)
        assert torch.allclose(lp, tr["log_probs"][i], atol=1e-5)
        assert (sde_step(v, x_t, ts[i], ts[i + 1], x_next=mean)[1] > lp).all()  # the mean is the most likely next step
        assert float((x_next - mean).std() / std) == pytest.approx(1.0, abs=0.15)  # the noise has the step's std
    other = sde_sample(tiny, [z], "refine", (2, 16, 8, 8), steps=4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other["latents"][-1], tr["latents"][-1])


@pytest.mark.parametrize("beta, precision", [(0.0, "no"), (0.1, "no"), (0.1, "bf16")])
def test_few_grpo_steps_change_only_adapter_weights(tmp_path, beta, precision):
    bb = labkit.load("tiny")
    spec = AD.inject(bb.transformer, "freqmole", rank=2)
    with torch.no_grad():  # a non-zero start, so the policy is not the base model
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    before = {k: v.clone() for k, v in bb.transformer.state_dict().items()}
    cfg = rl.GRPOConfig(
        group=3,
        inputs=2,
        sample_steps=3,
        eval_steps=2,
        size=64,
        bank=3,
        n_val=1,
        beta=beta,
        max_refs=2,
        budgets=(0.5, 1.0),
    )
    st_ = rl.train_grpo(
        bb,
        LoopConfig(
            steps=3,
            lr=1e-2,
            warmup=1,
            ckpt_every=100,
            eval_every=3,
            out_dir=str(tmp_path),
            progress=False,
            mixed_precision=precision,
        ),
        cfg,
        spec,
    )
    after = bb.transformer.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora_" in k for k in changed)
    h = st_["history"]
    tol = 1e-3 if precision == "no" else 5e-2  # bf16 rollouts and updates round differently, in fp32 log-prob space
    assert len(h) == 3 and all(np.isfinite(x["loss"]) and x["ratio"] == pytest.approx(1, abs=tol) for x in h)
    assert all(np.isfinite(v) for e in st_["evals"] for v in e.values() if isinstance(v, float))
    assert "val_reward" in st_["evals"][-1] and st_["evals"][-1]["kl_to_start"] > 0
    assert h[0]["budget"] == 2048 and h[-1]["budget"] == 4096
    assert (tmp_path / "adapter" / "adapter.safetensors").exists() and (tmp_path / "metrics.csv").exists()
    fresh = labkit.load("tiny")
    spec2 = AD.load(fresh.transformer, tmp_path)
    assert "grpo" in spec2
