import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import labkit
from labkit import data as D
from labkit import losses as L
from labkit.loop import LoopConfig, NonFiniteError, RunConfigMismatch, run_loop


def _editor_loss(bb, fixed: bool):
    """Flow-matching 'reconstruct' loss on tiny, through the loop's prepared module; fixed=True overfits one batch."""
    x_fixed = D.crop_batch(np.random.default_rng(0), "train", 4, 64)

    def loss_fn(s):
        x = x_fixed if fixed else D.crop_batch(s.rng, "train", 4, 64)
        with torch.no_grad():
            z = bb.encode(x)
        r = np.random.default_rng(1) if fixed else s.rng
        t = L.sample_t(r, 4)
        eps = torch.from_numpy(r.standard_normal(z.shape)).float()
        return L.flow_matching_loss(s.model, z, [z], "reconstruct", t, eps), {}

    return loss_fn


def _trainable_tiny():
    bb = labkit.load("tiny")
    bb.transformer.requires_grad_(True)
    return bb


def test_few_steps_lower_the_loss(tmp_path):
    bb = _trainable_tiny()
    cfg = LoopConfig(
        steps=40, lr=3e-3, warmup=5, ckpt_every=1000, out_dir=str(tmp_path), progress=False, mixed_precision="no"
    )
    st = run_loop(cfg, bb, _editor_loss(bb, fixed=True))
    losses = [h["loss"] for h in st["history"]]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "ckpt" / "trainable.safetensors").exists()
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pth"))  # no pickled run state


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_precision_is_pinned_and_nothing_is_left_on_the_module(tmp_path, precision):
    """fp32 and bf16 autocast, whatever this CPU offers: trainable weights stay fp32, the loss falls, and after
    training the module computes exactly what a fresh copy with the same weights computes (no autocast left)."""
    bb = _trainable_tiny()
    cfg = LoopConfig(
        steps=20, lr=3e-3, warmup=2, ckpt_every=1000, out_dir=str(tmp_path), progress=False, mixed_precision=precision
    )
    st = run_loop(cfg, bb, _editor_loss(bb, fixed=True))
    losses = [h["loss"] for h in st["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(p.dtype == torch.float32 for p in bb.transformer.parameters())
    assert "forward" not in bb.__dict__ and "_original_forward" not in bb.__dict__
    fresh = labkit.load("tiny")
    fresh.transformer.load_state_dict(bb.transformer.state_dict())
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(bb(x, 0.5, [x]), fresh(x, 0.5, [x]))


def test_gradient_checkpointing_and_accumulation_change_memory_not_the_result(tmp_path):
    """Checkpointing recomputes activations: same losses and weights; 2 micro-batches of the same batch = 1 batch."""

    def run(name, **kw):
        bb = _trainable_tiny()
        cfg = LoopConfig(
            steps=4,
            lr=3e-3,
            warmup=1,
            ckpt_every=1000,
            out_dir=str(tmp_path / name),
            progress=False,
            mixed_precision="no",
            **kw,
        )
        st = run_loop(cfg, bb, _editor_loss(bb, fixed=True))
        assert not bb.transformer.gradient_checkpointing  # switched off again after training
        return [h["loss"] for h in st["history"]], torch.cat([p.flatten() for p in bb.transformer.parameters()])

    (la, wa), (lb, wb), (lc, wc) = run("plain"), run("gc", gradient_checkpointing=True), run("acc", grad_accum=2)
    assert np.allclose(la, lb, rtol=1e-5) and torch.allclose(wa, wb, atol=1e-6)
    assert np.allclose(la, lc, rtol=1e-4) and torch.allclose(wa, wc, atol=1e-5)


def test_non_finite_loss_stops_with_the_step_and_saves_nothing(tmp_path):
    bb = _trainable_tiny()
    inner = _editor_loss(bb, fixed=True)

    def loss_fn(s):
        loss, logs = inner(s)
        return (loss * float("nan") if s.step == 3 else loss), logs

    cfg = LoopConfig(
        steps=10, lr=1e-3, warmup=1, ckpt_every=1, out_dir=str(tmp_path), progress=False, mixed_precision="no"
    )
    with pytest.raises(NonFiniteError, match="step 4: loss is nan"):
        run_loop(cfg, bb, loss_fn)
    state = json.loads((tmp_path / "ckpt" / "loop_state.json").read_text())
    assert state["step"] == 3  # the last good step is what was saved
    assert all(torch.isfinite(p).all() for p in bb.transformer.parameters())


def test_cli_with_a_huge_lr_exits_nonzero_and_writes_no_adapter(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "labkit.train",
            "sft",
            "--preset",
            "tiny",
            "--steps",
            "6",
            "--size",
            "64",
            "--batch",
            "2",
            "--bank",
            "2",
            "--rank",
            "2",
            "--lr",
            "1e6",
            "--val-images",
            "0",
            "--mixed-precision",
            "no",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "failed: step" in r.stderr and ("loss is" in r.stderr or "gradient norm is" in r.stderr)
    assert not (tmp_path / "adapter" / "adapter.safetensors").exists()


def test_finished_run_resumes_with_the_same_config_and_refuses_another(tmp_path):
    def run(lr, fresh=False):
        bb = _trainable_tiny()
        cfg = LoopConfig(
            steps=4,
            lr=lr,
            warmup=1,
            ckpt_every=2,
            out_dir=str(tmp_path),
            progress=False,
            mixed_precision="no",
            fresh=fresh,
        )
        st = run_loop(cfg, bb, _editor_loss(bb, fixed=True), run_config=dict(recipe="x"))
        return st, torch.cat([p.flatten() for p in bb.transformer.parameters()])

    a, wa = run(1e-3)
    b, wb = run(1e-3)  # same config: resumes the finished run, nothing more to do
    assert b["step"] == 4 and len(b["history"]) == 4 and torch.equal(wa, wb)
    with pytest.raises(RunConfigMismatch, match=r"lr: 0.001 -> 0.01.*fresh"):
        run(1e-2)
    c, wc = run(1e-2, fresh=True)
    assert c["step"] == 4 and not torch.equal(wa, wc)


class Killed(Exception):
    pass


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_kill_matches_uninterrupted(tmp_path, ema):
    def run(out, kill_at=None):
        bb = _trainable_tiny()
        inner = _editor_loss(bb, fixed=False)
        calls = {"n": 0}

        def loss_fn(s):
            calls["n"] += 1
            if kill_at and calls["n"] == kill_at:
                raise Killed
            return inner(s)

        cfg = LoopConfig(
            steps=10, lr=1e-3, warmup=2, ckpt_every=4, out_dir=str(out), progress=False, ema=ema, mixed_precision="no"
        )
        return run_loop(cfg, bb, loss_fn), bb

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
        bb = _trainable_tiny()
        cfg = LoopConfig(
            steps=12,
            lr=3e-3,
            warmup=1,
            ckpt_every=1000,
            out_dir=str(tmp_path / str(ema)),
            progress=False,
            ema=ema,
            mixed_precision="no",
        )
        run_loop(cfg, bb, _editor_loss(bb, fixed=True))
        return torch.cat([p.flatten() for p in bb.transformer.parameters()])

    w0 = torch.cat([p.flatten() for p in labkit.load("tiny").transformer.parameters()])
    raw, avg = run(0.0), run(0.95)
    assert 0 < (avg - w0).norm() < (raw - w0).norm()


def test_loop_checkpoint_survives_a_crash_while_saving(tmp_path, monkeypatch):
    """A crash in the middle of writing the step-4 checkpoint (after accelerate's files, before the loop state)
    leaves the step-2 checkpoint whole in ckpt/; the run resumes from it and ends where an uninterrupted one does."""
    import labkit.loop as LP

    def run(out):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 1)
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        return m, run_loop(
            LoopConfig(
                steps=6, lr=1e-2, warmup=1, ckpt_every=2, out_dir=str(out), progress=False, mixed_precision="no"
            ),
            m,
            lambda s: (((s.model(x) - y) ** 2).mean(), {}),
        )

    real = LP.write_json

    def crash_at_step_4(obj, path):
        if Path(path).name == "loop_state.json" and obj.get("step") == 4:
            raise OSError("disk full")
        return real(obj, path)

    monkeypatch.setattr(LP, "write_json", crash_at_step_4)
    with pytest.raises(OSError):
        run(tmp_path / "a")
    assert (
        json.loads((tmp_path / "a" / "ckpt" / "loop_state.json").read_text())["step"] == 2
    )  # the last whole checkpoint
    assert LP._latest_ckpt(tmp_path / "a") == tmp_path / "a" / "ckpt"
    monkeypatch.setattr(LP, "write_json", real)
    resumed, st = run(tmp_path / "a")
    plain, _ = run(tmp_path / "b")
    assert st["step"] == 6 and [h["step"] for h in st["history"]] == list(range(1, 7))
    assert torch.allclose(resumed.weight, plain.weight, atol=1e-7)


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


@pytest.mark.parametrize(
    "adapter, extra, precision",
    [
        ("freqmole", dict(w_freq=0.5, boundary_alpha=9.0), "no"),
        ("lora", dict(mask_weight=1.0), "no"),
        ("freqmole", dict(w_freq=0.5, boundary_alpha=9.0), "bf16"),
    ],
)
def test_sft_lowers_loss_and_trains_only_adapters(tmp_path, adapter, extra, precision):
    from labkit import adapters as AD
    from labkit.sft import SFTConfig, train_sft

    bb = labkit.load("tiny")
    base = {k: v.clone() for k, v in bb.transformer.state_dict().items()}
    cfg = SFTConfig(adapter=adapter, rank=4, size=64, batch=4, bank=4, val_images=2, val_steps=2, **extra)
    st = train_sft(
        bb,
        LoopConfig(
            steps=30,
            lr=3e-3,
            warmup=3,
            ckpt_every=1000,
            eval_every=30,
            out_dir=str(tmp_path),
            progress=False,
            mixed_precision=precision,
        ),
        cfg,
    )
    losses = [h["loss"] for h in st["history"]]
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    after = {k.replace(".base_layer", ""): v for k, v in bb.transformer.state_dict().items() if "lora_" not in k}
    assert set(after) == set(base)
    assert [k for k in base if not torch.equal(base[k], after[k])] == []  # base weights untouched
    assert all(p.dtype == torch.float32 for n, p in bb.transformer.named_parameters() if "lora_" in n)
    assert (tmp_path / "adapter" / "adapter.safetensors").exists() and (tmp_path / "metrics.csv").exists()
    assert (tmp_path / "val" / "step_000030.png").exists() and "val_region_psnr" in st["evals"][-1]
    fresh = labkit.load("tiny")
    AD.load(fresh.transformer, tmp_path)
    x = torch.randn(1, 16, 8, 8)
    assert torch.allclose(fresh(x, 0.5, [x, x], prompt="refine"), bb(x, 0.5, [x, x], prompt="refine"), atol=1e-6)


def test_alpha_freezing_survives_resume(tmp_path):
    """α frozen from step 3: a run stopped after steps 3 and 5 and resumed ends where the uninterrupted run ends,
    and its α after step 8 is its α after step 3 (the freeze holds across resumes)."""
    from safetensors.torch import load_file

    from labkit import adapters as AD
    from labkit.sft import SFTConfig, train_sft

    cfg = SFTConfig(adapter="freqmole", rank=2, size=64, batch=2, bank=4, val_images=0, alpha_freeze_step=3)

    def run(out, stop_after=None):
        bb = labkit.load(
            "tiny"
        )  # max_minutes ~0 makes the run stop (and save) after one more step; it is not part of the config
        loop = LoopConfig(
            steps=8,
            lr=3e-2,
            warmup=1,
            ckpt_every=1,
            eval_every=1000,
            out_dir=str(out),
            progress=False,
            mixed_precision="no",
            max_minutes=1e-9 if stop_after else None,
        )
        train_sft(bb, loop, cfg)
        return bb

    def alphas(out):
        return {
            k: v for k, v in load_file(str(out / "ckpt" / "trainable.safetensors")).items() if "lora_freq_alpha" in k
        }

    full = run(tmp_path / "a")
    for _ in range(3):
        run(tmp_path / "b", stop_after=True)
    a3 = alphas(tmp_path / "b")
    for _ in range(2):
        run(tmp_path / "b", stop_after=True)
    resumed = run(tmp_path / "b")
    fa, fb = AD.adapter_state(full.transformer), AD.adapter_state(resumed.transformer)
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)
    a8 = alphas(tmp_path / "b")
    assert a3 and all(torch.equal(a3[k], a8[k]) for k in a3)  # frozen after step 3, through two resumes
    t = labkit.load("tiny").transformer
    AD.inject(t, "freqmole", rank=2)
    init = {"transformer." + k: v for k, v in AD.adapter_state(t).items() if "lora_freq_alpha" in k}
    assert set(init) == set(a3) and any(not torch.equal(init[k], a3[k]) for k in a3)  # α did train before the freeze


@pytest.mark.slow
def test_accelerate_launch_one_cpu_process(tmp_path, accelerate_launch):
    accelerate_launch(
        1,
        "-m",
        "labkit.train",
        "sft",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--size",
        "64",
        "--batch",
        "2",
        "--bank",
        "2",
        "--rank",
        "2",
        "--out",
        tmp_path,
    )
    assert (tmp_path / "adapter" / "adapter.safetensors").exists()


def test_editor_probe_continues_from_weights_on_one_task(tmp_path):
    """`labkit train editor --init W --task-probs ... --upscale 4`: trains on from W, only the drawn task."""
    import json

    from safetensors.torch import load_file

    from labkit import models as M
    from labkit import presets as P
    from labkit.train import main as train_main

    init = tmp_path / "init"
    M.save_weights(M.build(P.get("tiny", weights=None)), init, {})
    out = tmp_path / "out"
    assert (
        train_main(
            [
                "editor",
                "--preset",
                "tiny",
                "--init",
                str(init),
                "--task-probs",
                "0",
                "1",
                "0",
                "0",
                "0",
                "--upscale",
                "4",
                "--editor-steps",
                "3",
                "--bank-size",
                "8",
                "--out",
                str(out),
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    ed = json.loads((out / "card.json").read_text())["stages"]["editor"]
    assert ed["recipe"]["task_probs"] == [0, 1, 0, 0, 0] and ed["recipe"]["upscale"] == [4] and ed["init"] == str(init)
    assert ed["warm_restart"]
    assert {k for e in ed["evals"] for k in e if k.startswith("val_loss")} == {
        "val_loss_upscale"
    }  # only the drawn task
    a, b = load_file(init / "vae.safetensors"), load_file(out / "vae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the VAE stays frozen
    a, b = load_file(init / "transformer.safetensors"), load_file(out / "transformer.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the editor trained on from the given weights


DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
import labkit
from labkit import util
from labkit import adapters as AD
from labkit.loop import LoopConfig
from labkit.sft import SFTConfig, train_sft

out, log, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
writes = []
_save = util.atomic_save
def spy(write, path):
    writes.append(str(path))
    return _save(write, path)
util.atomic_save = spy
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("labkit.") and getattr(mod, "atomic_save", None) is _save:
        mod.atomic_save = spy
torch.set_num_threads(1)
bb = labkit.load("tiny")
cfg = SFTConfig(adapter="lora", rank=2, size=64, batch=batch, bank=8, val_images=0)
train_sft(bb, LoopConfig(steps=4, lr=1e-2, warmup=1, ckpt_every=2, eval_every=1000, out_dir=str(out), progress=False,
                         mixed_precision="no"), cfg)
from accelerate import PartialState
rank = PartialState().process_index
save_file(AD.adapter_state(bb.transformer), str(log / f"weights_{rank}.safetensors"))
(log / f"writes_{rank}.json").write_text(json.dumps(writes))
"""


@pytest.mark.slow
def test_two_cpu_processes_sync_gradients_and_match_one_process_with_the_doubled_batch(tmp_path, accelerate_launch):
    """Two CPU processes under accelerate launch: both ranks end with the same weights, equal (within fp
    tolerance) to one process with batch 2B, and only rank 0 writes labkit's files."""

    from safetensors.torch import load_file

    script = tmp_path / "ddp_sft.py"
    script.write_text(DDP_SCRIPT)

    def launch(n, batch, name):
        log = tmp_path / name
        log.mkdir()
        accelerate_launch(n, script, log / "out", log, batch)
        return log

    two, one = launch(2, 2, "two"), launch(1, 4, "one")
    w0, w1, ws = (
        load_file(str(p))
        for p in (two / "weights_0.safetensors", two / "weights_1.safetensors", one / "weights_0.safetensors")
    )
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were synchronised
    init = {k: v for k, v in w0.items() if "lora_B" in k}
    assert any(v.abs().max() > 0 for v in init.values())  # and training moved the adapter
    assert all(torch.allclose(w0[k], ws[k], atol=2e-5, rtol=1e-4) for k in w0)  # = one process with the doubled batch
    assert json.loads((two / "writes_1.json").read_text()) == []  # rank 1 writes nothing of labkit's
    assert any("run.json" in p for p in json.loads((two / "writes_0.json").read_text()))
    assert (two / "out" / "adapter" / "adapter.safetensors").exists()


FSDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import labkit
from labkit.loop import LoopConfig
from labkit.sft import SFTConfig, train_sft
from accelerate import PartialState
out, fsdp, batch = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
torch.set_num_threads(1)
bb = labkit.load("tiny")
cfg = SFTConfig(adapter="freqmole", rank=2, size=64, batch=batch, bank=8, val_images=0)
st = train_sft(bb, LoopConfig(steps=4, lr=1e-2, warmup=1, ckpt_every=2, eval_every=2, out_dir=str(out), progress=False,
                              mixed_precision="no", fsdp=fsdp), cfg)
blocks = [n for n, m in bb.transformer.named_modules() if type(m).__name__.startswith("FSDP")]
rank = PartialState().process_index
res = dict(loss=[h["loss"] for h in st["history"]], engine=st["fsdp_engine"], fsdp_modules=blocks,
           distributed=str(PartialState().distributed_type))
(out / f"result_{rank}.json").write_text(json.dumps(res))
"""


@pytest.mark.slow
def test_fsdp_two_cpu_processes_match_one_process(tmp_path, accelerate_launch):
    """--fsdp under 2 CPU processes (gloo): the transformer's blocks are FSDP2 units, the frozen base is sharded,
    the adapter trains; the loss curve and the saved adapter equal one process with the doubled batch, and a
    rerun resumes from the sharded checkpoint to the same adapter.

    accelerate's FSDP plugin does not apply to CPU processes (its state keeps MULTI_CPU: the plugin is only
    honoured for GPU-like devices), so on CPU labkit applies the same FSDP2 (torch's fully_shard on the blocks
    the plugin would wrap, then the root): the code path the plugin takes on GPUs, through torch."""

    from safetensors.torch import load_file

    script = tmp_path / "fsdp_sft.py"
    script.write_text(FSDP_SCRIPT)

    def launch(n, batch, out, fsdp="1"):
        accelerate_launch(n, script, out, fsdp, batch)
        return json.loads((out / "result_0.json").read_text())

    two, one = launch(2, 2, tmp_path / "two"), launch(1, 4, tmp_path / "one", fsdp="0")
    assert (
        two["engine"] == "torch" and "MULTI_CPU" in two["distributed"]
    )  # the plugin was not applied on CPU: torch's fully_shard was
    assert len(two["fsdp_modules"]) >= 3 and one["fsdp_modules"] == []  # blocks + the transformer root are FSDP units
    assert np.allclose(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)  # the same loss curve
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("two", "one"))
    assert set(a) == set(b) and all(
        torch.allclose(a[k], b[k], atol=1e-5) for k in a
    )  # the same adapter, saved whole once
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # and training moved it
    assert json.loads((tmp_path / "two" / "result_1.json").read_text())["loss"] == two["loss"]
    launch(
        2, 2, tmp_path / "two"
    )  # the finished run again: resumes from its sharded checkpoint (per-rank optimizer shards)
    c = load_file(str(tmp_path / "two" / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_optimizer_checkpoint_round_trips_without_pickles(tmp_path):
    """save_optimizer/load_optimizer (the FSDP path's, through torch.distributed.checkpoint's state_dict API): the
    AdamW moments and the schedule come back exactly, from safetensors + JSON only; the next step then matches."""
    from labkit.loop import load_optimizer, save_optimizer

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def step(m, opt, sched, seed):
        m(torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)

    m, opt, sched = make()
    for s in range(3):
        step(m, opt, sched, s)
    save_optimizer(m, opt, sched, tmp_path, main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    m2, opt2, sched2 = make()
    m2.load_state_dict(m.state_dict())
    load_optimizer(m2, opt2, sched2, tmp_path)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    step(m, opt, sched, 9), step(m2, opt2, sched2, 9)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_a_tracker_run_writes_losses_val_metrics_and_val_images(tmp_path):
    """--report-to tensorboard (accelerate's tracker): a tiny SFT run logs its train losses, its val metrics and
    its val image under <run>/logs, read back with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from labkit.sft import SFTConfig, train_sft

    cfg = SFTConfig(adapter="lora", rank=2, size=64, batch=2, bank=2, val_images=1, val_steps=1)
    loop = LoopConfig(steps=3, lr=1e-3, warmup=1, ckpt_every=1000, eval_every=3, out_dir=str(tmp_path),
                      progress=False, mixed_precision="no", report_to="tensorboard")  # fmt: skip
    st = train_sft(labkit.load("tiny"), loop, cfg)
    ev = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    ev.Reload()
    tags = ev.Tags()
    loss = [e.value for e in ev.Scalars("train/loss")]
    assert loss == pytest.approx([h["loss"] for h in st["history"]], rel=1e-5)  # every step, the loop's numbers
    assert any(t.startswith("val/") for t in tags["scalars"]) and "val/samples" in tags["images"]
    with pytest.raises(ValueError, match="report_to"):
        LoopConfig(report_to="mlflow-typo").check()
