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


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_kill_matches_uninterrupted(tmp_path, ema):
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
        cfg = LoopConfig(steps=10, lr=1e-3, warmup=2, ckpt_every=4, out_dir=str(out), progress=False, ema=ema)
        return run_loop(cfg, {"transformer": bb.transformer}, loss_fn), bb

    full, bb_a = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill_at=7)  # dies after the step-4 checkpoint, steps 5-6 lost
    resumed, bb_b = run(tmp_path / "b")
    a = [h["loss"] for h in full["history"]]
    b = [h["loss"] for h in resumed["history"]]
    assert len(a) == len(b) == 10
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6)
    wa, wb = (torch.cat([p.flatten() for p in m.transformer.parameters()]) for m in (bb_a, bb_b))
    assert torch.allclose(wa, wb, atol=1e-5)  # final (EMA) weights resume exactly too


def test_ema_weights_lag_the_raw_weights(tmp_path):
    """With EMA the loop ends on the averaged weights: between the start and the raw end point."""
    def run(ema):
        bb = labkit.load("tiny")
        bb.transformer.requires_grad_(True)
        cfg = LoopConfig(steps=12, lr=3e-3, warmup=1, ckpt_every=1000, out_dir=str(tmp_path / str(ema)), progress=False, ema=ema)
        run_loop(cfg, {"transformer": bb.transformer}, _editor_loss(bb, fixed=True))
        return torch.cat([p.flatten() for p in bb.transformer.parameters()])
    w0 = torch.cat([p.flatten() for p in labkit.load("tiny").transformer.parameters()])
    raw, avg = run(0.0), run(0.95)
    assert 0 < (avg - w0).norm() < (raw - w0).norm()


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


@pytest.mark.parametrize("adapter, extra", [("freqmole", dict(w_freq=0.5, boundary_alpha=9.0)), ("lora", dict(mask_weight=1.0))])
def test_sft_lowers_loss_and_trains_only_adapters(tmp_path, adapter, extra):
    from labkit.train import SFTConfig, train_sft
    from labkit import freqmole as FM
    bb = labkit.load("tiny")
    base = {k: v.clone() for k, v in bb.transformer.state_dict().items()}
    cfg = SFTConfig(adapter=adapter, rank=4, size=64, batch=4, bank=4, val_images=2, val_steps=2, **extra)
    st = train_sft(bb, LoopConfig(steps=30, lr=3e-3, warmup=3, ckpt_every=1000, eval_every=30, out_dir=str(tmp_path),
                                  progress=False), cfg)
    losses = [h["loss"] for h in st["history"]]
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    after = {k.replace(".base_layer", ""): v for k, v in bb.transformer.state_dict().items() if "lora_" not in k}
    assert set(after) == set(base)
    assert [k for k in base if not torch.equal(base[k], after[k])] == []  # base weights untouched
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "metrics.csv").exists()
    assert (tmp_path / "val" / "step_000030.png").exists() and "val_region_psnr" in st["evals"][-1]
    fresh = labkit.load("tiny")
    FM.load(fresh.transformer, tmp_path)
    x = torch.randn(1, 16, 8, 8)
    assert torch.allclose(fresh(x, 0.5, [x, x], prompt="refine"), bb(x, 0.5, [x, x], prompt="refine"), atol=1e-5)


@pytest.mark.slow
def test_accelerate_launch_one_cpu_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "labkit.train", "sft", "--preset", "tiny", "--steps", "3", "--size", "64",
           "--batch", "2", "--bank", "2", "--rank", "2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "adapter.safetensors").exists()


def test_editor_probe_continues_from_weights_on_one_task(tmp_path):
    """`labkit.train mini --stage editor --init W --task-probs ... --upscale 4`: trains on from W, only the drawn task."""
    import json
    from safetensors.torch import load_file
    from labkit import models as M
    from labkit import presets as P
    from labkit.train import main as train_main
    init = tmp_path / "init"
    M.save_weights(M.build(P.get("tiny", weights=None)), init, {})
    out = tmp_path / "out"
    train_main(["mini", "--preset", "tiny", "--stage", "editor", "--init", str(init), "--task-probs", "0", "1", "0", "0",
                "--upscale", "4", "--editor-steps", "3", "--bank-size", "8", "--out", str(out), "--run-dir", str(tmp_path / "run")])
    ed = json.loads((out / "card.json").read_text())["stages"]["editor"]
    assert ed["recipe"]["task_probs"] == [0, 1, 0, 0] and ed["recipe"]["upscale"] == [4] and ed["init"] == str(init)
    assert {k for e in ed["evals"] for k in e if k.startswith("val_loss")} == {"val_loss_upscale"}  # only the drawn task
    a, b = load_file(init / "vae.safetensors"), load_file(out / "vae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the VAE stays frozen
    a, b = load_file(init / "transformer.safetensors"), load_file(out / "transformer.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the editor trained on from the given weights
