import numpy as np
import pytest
import torch

import labkit
from labkit import data as D
from labkit import losses as L
from labkit.train import LoopConfig, run_loop


def _editor_loss(bb, fixed: bool):
    """Flow-matching 'reconstruct' loss on tiny; fixed=True overfits one batch."""
    x_fixed = D.crop_batch(np.random.default_rng(0), "train", 4, 64)

    def loss_fn(rng, step):
        x = x_fixed if fixed else D.crop_batch(rng, "train", 4, 64)
        with torch.no_grad():
            z = bb.encode(x)
        r = np.random.default_rng(1) if fixed else rng
        t = L.sample_t(r, 4)
        eps = torch.from_numpy(r.standard_normal(z.shape)).float()
        return L.flow_matching_loss(bb, z, [z], "reconstruct", t, eps), {}
    return loss_fn


def test_few_steps_lower_the_loss(tmp_path):
    bb = labkit.load("tiny")
    bb.transformer.requires_grad_(True)
    cfg = LoopConfig(steps=40, lr=3e-3, warmup=5, ckpt_every=1000, out_dir=str(tmp_path), progress=False)
    st = run_loop(cfg, {"transformer": bb.transformer}, _editor_loss(bb, fixed=True))
    losses = [h["loss"] for h in st["history"]]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "ckpt.pt").exists()


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    def run(out, kill_at=None):
        bb = labkit.load("tiny")
        bb.transformer.requires_grad_(True)
        inner = _editor_loss(bb, fixed=False)
        calls = {"n": 0}

        def loss_fn(rng, step):
            calls["n"] += 1
            if kill_at and calls["n"] == kill_at:
                raise Killed
            return inner(rng, step)
        cfg = LoopConfig(steps=10, lr=1e-3, warmup=2, ckpt_every=4, out_dir=str(out), progress=False)
        return run_loop(cfg, {"transformer": bb.transformer}, loss_fn)

    full = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill_at=7)  # dies after the step-4 checkpoint, steps 5-6 lost
    resumed = run(tmp_path / "b")
    a = [h["loss"] for h in full["history"]]
    b = [h["loss"] for h in resumed["history"]]
    assert len(a) == len(b) == 10
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_is_atomic(tmp_path):
    from labkit.util import atomic_save

    def bad_writer(p):
        open(p, "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_save(bad_writer, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_boundary_band_and_weight():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 16:48, 16:48] = 1
    band = L.boundary_band(m, radius=4)
    assert band[0, 0, 32, 32] == 0 and band[0, 0, 16, 16] == 1 and band[0, 0, 0, 0] == 0
    w = L.boundary_weight(m, (8, 8), alpha=9.0, radius=4)
    assert w.min() >= 1 and w.max() <= 10 and w.shape == (1, 1, 8, 8)


def test_frequency_loss_zero_at_target_and_positive_elsewhere():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 8, 8, generator=g)
    m = torch.ones(2, 1, 64, 64)
    loss, parts = L.frequency_loss(z, z, z, m)
    assert loss.item() < 1e-5
    loss2, _ = L.frequency_loss(z + torch.randn(z.shape, generator=g), z, z, m)
    assert loss2.item() > 0.1
