import numpy as np
import torch

from labkit import editor as E
from labkit.sampling import euler, timesteps


class StraightFlow:
    """A 'model' that knows x0: on the straight path v = (x_t - x0) / t, so Euler must land on x0."""

    device = torch.device("cpu")

    def __init__(self, x0):
        self.x0 = x0

    def encode_prompt(self, prompt, batch=None):
        return None

    def __call__(self, x_t, t, contexts=(), prompt_embeds=None, **kw):
        return (x_t - self.x0) / t


def test_euler_integrates_a_straight_flow_exactly():
    x0 = torch.randn(2, 16, 4, 4)
    out, path = euler(StraightFlow(x0), [], "reconstruct", shape=(2, 16, 4, 4), steps=5,
                      generator=torch.Generator().manual_seed(0), return_path=True)
    assert torch.allclose(out, x0, atol=1e-5) and len(path) == 6
    ts = timesteps(4, shift=3.0)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()


def test_task_batches_shapes():
    cfg = E.EditorConfig(batch=2, size=64)
    rng = np.random.default_rng(0)
    for task in E.TASKS:
        b = E.task_batch(task, rng, "train", cfg)
        assert b["target"].shape == (2, 3, 64, 64)
        if task == "upscale":
            assert b["contexts"][0].shape == (2, 3, 32, 32)
        if task == "restore":
            assert len(b["contexts"]) == 2 and b["mask"].shape == (2, 1, 64, 64)


def test_oracle_paste_copies_the_true_region():
    from labkit import data as D
    for s in range(4):
        t = D.make_triplet(s, "val", 128, factor=1, view_strength=1.0, degradation="blur")
        o = E.oracle_paste(t)
        m = t.mask[0] > 0.5
        assert torch.equal(o[:, ~m], t.lrgi[:, ~m])  # outside the mask: the context, untouched
        a, b = o[:, m].flatten().numpy(), t.hrgt[:, m].flatten().numpy()
        assert np.corrcoef(a, b)[0, 1] > 0.8  # inside: the reference's content through the true warp
