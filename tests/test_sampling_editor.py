import numpy as np
import torch

from labkit import data as D
from labkit import images as IM
from labkit import pretrain as PT
from labkit.experiments import mini_backbone as XM
from labkit.sampling import sample, times


class StraightFlow:
    """A 'model' that knows x0: on the straight path v = (x_t - x0) / t, so Euler must land on x0."""

    device = torch.device("cpu")
    scheduler_config = dict(shift=1.0, use_dynamic_shifting=False)

    def __init__(self, x0):
        self.x0 = x0

    def encode_prompt(self, prompt, batch=None):
        return None

    def __call__(self, x_t, t, contexts=(), prompt_embeds=None, **kw):
        return (x_t - self.x0) / t


def test_sampler_integrates_a_straight_flow_exactly():
    x0 = torch.randn(2, 16, 4, 4)
    out, path = sample(
        StraightFlow(x0),
        [],
        "reconstruct",
        shape=(2, 16, 4, 4),
        steps=5,
        generator=torch.Generator().manual_seed(0),
        return_path=True,
    )
    assert torch.allclose(out, x0, atol=1e-5) and len(path) == 6
    # img2img: from x0 itself noised to strength 0.4, the remaining 2 of 5 steps also land on x0
    out2, path2 = sample(
        StraightFlow(x0),
        [],
        "reconstruct",
        shape=(2, 16, 4, 4),
        steps=5,
        init=x0,
        strength=0.4,
        generator=torch.Generator().manual_seed(0),
        return_path=True,
    )
    assert torch.allclose(out2, x0, atol=1e-5) and len(path2) == 3


def test_sampler_uses_the_scheduler_as_the_flux_kontext_pipeline_does():
    """With FLUX's scheduler config the noise levels are the pipeline's: sigmas linspace(1, 1/N, N) shifted by
    mu(token count) through diffusers' own retrieve_timesteps; with mini's config they are plain linspace."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps

    flux = dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        num_train_timesteps=1000,
    )
    bb = StraightFlow(None)
    bb.scheduler_config = flux
    for steps, tokens in [(4, 64), (28, 4096), (8, 1024)]:
        sch = FlowMatchEulerDiscreteScheduler(**flux)
        ts, _ = retrieve_timesteps(
            sch, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens)
        )
        assert torch.allclose(times(bb, steps, tokens)[:-1], ts.float() / 1000, atol=1e-6)
    bb.scheduler_config = dict(shift=1.0, use_dynamic_shifting=False)
    assert torch.allclose(times(bb, 4, 64), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_task_batches_shapes():
    cfg = PT.EditorConfig(batch=2, size=64)
    rng = np.random.default_rng(0)
    for task in [
        t for t in PT.TASKS if t != "refine"
    ]:  # refine examples vary in shape: pretrain.refine_example (own test)
        b = PT.task_batch(task, rng, "train", cfg)
        assert b["target"].shape == (2, 3, 64, 64)
        assert b["contexts"][0].shape == (2, 3, 64, 64)  # every context on the target's grid
        if task == "restore":
            assert len(b["contexts"]) == 2 and b["mask"].shape == (2, 1, 64, 64)


def test_upscale_context_is_the_bicubic_draft_of_the_target():
    cfg = PT.EditorConfig(batch=3, size=64)
    for f in (2, 4):
        b = PT.task_batch("upscale", np.random.default_rng(1), "train", cfg, factor=f)
        assert torch.allclose(b["contexts"][0], IM.bicubic_draft(b["target"], f))
    b = PT.task_batch("upscale", np.random.default_rng(1), "train", PT.EditorConfig(batch=16, size=64))
    used = [
        f
        for i in range(16)
        for f in (2, 4)
        if torch.allclose(b["contexts"][0][i : i + 1], IM.bicubic_draft(b["target"][i : i + 1], f))
    ]
    assert len(used) == 16 and set(used) == {2, 4}  # every draft is x2 or x4, and both occur


def test_oracle_paste_copies_the_true_region():

    for s in range(4):
        t = D.make_triplet(s, "val", 128, factor=1, view_strength=1.0, degradation="blur")
        o = PT.oracle_paste(t)
        m = t.mask[0] > 0.5
        assert torch.equal(o[:, ~m], t.lowres[:, ~m])  # outside the mask: the context, untouched
        a, b = o[:, m].flatten().numpy(), t.target[:, m].flatten().numpy()
        assert np.corrcoef(a, b)[0, 1] > 0.8  # inside: the reference's content through the true warp


def test_baseline_claim_says_whether_the_vae_ceiling_leaves_room():
    rng = np.random.default_rng(0)
    base = rng.normal(21.0, 1.0, 12)
    per = dict(editor=base + 1.0 + rng.normal(0, 0.1, 12), input=base, vae_ceiling=base + 2.0)
    c = XM.baseline_claim(dict(per_case=per), "dB")
    assert c["verdict"] == "holds" and c["holds"] and c["reachable"] and "reachable" in c["note"]
    assert c["ci"][0] > 0.8 and c["mde"] > 0
    per = dict(editor=base + 1.0, input=base + 4.0, vae_ceiling=base + 2.0)
    c = XM.baseline_claim(dict(per_case=per), "dB")
    assert c["verdict"] == "refuted" and not c["reachable"] and "no latent editor" in c["note"]
    strong = [True] * 6 + [False] * 6  # only the strong artifacts: the first half, where the editor wins
    per = dict(editor=np.r_[base[:6] + 2.0, base[6:] - 3.0], input=base, vae_ceiling=base + 3.0)
    assert XM.baseline_claim(dict(per_case=per, strong=strong), "dB", strong=True)["holds"]
    assert not XM.baseline_claim(dict(per_case=per, strong=strong), "dB")["holds"]


def test_strong_restore_artifacts_remove_what_only_the_reference_has():

    img = IM.to_numpy(D.make_triplet(3, "val", 128, factor=1, degradation="blur").target)
    rng = np.random.default_rng(0)
    hf = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731  (mean horizontal gradient)
    smear = D.degrade(rng, img, "smear")
    assert abs(smear.mean() - img.mean()) < 0.01 and hf(smear) < 0.5 * hf(img)  # colour kept, detail gone
    occ = D.degrade(rng, img, "occlude")
    assert occ.shape == img.shape and np.ptp(occ.reshape(-1, 3), 0).max() == 0  # one flat colour: content gone


def test_restore_batches_use_the_requested_artifacts():
    cfg = PT.EditorConfig(batch=4, size=64)
    kinds = ["smear", "occlude", "blur", "occlude"]
    b = PT.task_batch("restore", np.random.default_rng(0), "train", cfg, degradations=kinds)
    assert [t.meta["degradation"] for t in b["trips"]] == kinds
    m = b["mask"] > 0.5
    occluded = b["contexts"][0][1][:, m[1, 0]]  # inside the mask of the occluded example: (nearly) one colour
    assert occluded.std(dim=1).max() < 0.05
    drawn = PT.task_batch("restore", np.random.default_rng(0), "train", PT.EditorConfig(batch=32, size=64))
    assert {t.meta["degradation"] for t in drawn["trips"]} <= set(cfg.restore_degradations)


def test_inpainting_blend_keeps_the_latents_outside_the_mask():
    """strength + latent mask blending (FluxKontextInpaintPipeline's way): kept cells end exactly at the kept
    latents, generated cells follow the flow."""
    g = torch.Generator().manual_seed(1)
    x0, keep = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    km = torch.zeros(1, 1, 4, 4)
    km[..., :2, :] = 1
    out = sample(
        StraightFlow(x0),
        [],
        "reconstruct",
        (1, 16, 4, 4),
        steps=4,
        init=keep,
        strength=0.5,
        keep=keep,
        keep_mask=km,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out[..., :2, :], keep[..., :2, :]) and torch.allclose(out[..., 2:, :], x0[..., 2:, :], atol=1e-5)


def test_refine_with_strength_and_blend_runs_on_tiny():
    from labkit import inference as I

    c = D.make_triplet(0, "test", 64, 2)
    a, _ = I.refine_tensor(c.draft, c.mask, c.reference, method="full", preset="tiny", steps=4, blend=False)
    b, _ = I.refine_tensor(
        c.draft, c.mask, c.reference, method="full", preset="tiny", steps=4, strength=0.5, blend=True
    )
    far = torch.nn.functional.max_pool2d(c.mask[None], 33, 1, 16)[0, 0] == 0
    rt = I.load_refiner("tiny").bb.roundtrip(c.draft[None])[0]
    assert (b - rt)[:, far].abs().mean() < (a - rt)[
        :, far
    ].abs().mean()  # the kept background is the draft's (in latent space)
