"""Seconds per training step of the mini VAE and the mini editor at their recipe's batch and sizes, fp32 against
bf16 autocast, measured side by side (the variants alternate, so a busy machine slows them alike; min over reps).
bf16 only helps on CPUs with native bf16 (avx512_bf16 / amx_bf16). The editor's bf16 step is also timed with
FLUX's q/k RMSNorms left as torch's own (their fp32 weight meets bf16 activations: no fused kernel) to show what
labkit.models.AutocastRMSNorm buys."""

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit import data as D
from labkit import models as M
from labkit import presets as P
from labkit.pretrain import EditorConfig
from labkit.vae import VAEConfig


def timed(steps: dict, reps: int = 4) -> dict:
    """name -> min seconds of one call, the calls alternating rep by rep (after one warm-up each)."""
    for f in steps.values():
        f()
    ts = {k: [] for k in steps}
    for _ in range(reps):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in ts.items()}


def unfused(bb):
    """A copy of the backbone whose RMSNorms are torch's own again (what labkit did before AutocastRMSNorm)."""
    other = copy.deepcopy(bb)
    for m in other.transformer.modules():
        if type(m) is M.AutocastRMSNorm:
            m.__class__ = nn.RMSNorm
    return other


def main(profile: bool = False) -> None:
    bb = M.build(P.get("mini", weights=None))
    vc, ec = VAEConfig(), EditorConfig()
    x = D.crop_batch(np.random.default_rng(0), "train", vc.batch, vc.crop)
    vopt = torch.optim.AdamW(bb.vae.parameters(), 1e-3)
    n = ec.size // 8
    z = [torch.randn(ec.batch, 16, n, n) for _ in range(3)]

    def vae_step(bf16: bool):
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                rec = bb.vae.decode(bb.vae.encode(x * 2 - 1).latent_dist.mode()).sample
                loss = F.l1_loss(rec.float(), x * 2 - 1)
            loss.backward(), vopt.step(), vopt.zero_grad()

        return f

    def editor_step(model, bf16: bool):
        opt = torch.optim.AdamW(model.transformer.parameters(), 1e-3)

        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                v = model(z[0], torch.rand(ec.batch), z[1:], prompt="restore")
                loss = (v.float() ** 2).mean()
            loss.backward(), opt.step(), opt.zero_grad()

        return f

    if profile:  # where the editor's bf16 step spends its time, by op
        step = editor_step(bb, True)
        step()
        with torch.profiler.profile() as prof:
            step(), step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"threads: {torch.get_num_threads()}")
    v = timed(dict(fp32=vae_step(False), bf16=vae_step(True)))
    e = timed(dict(fp32=editor_step(bb, False), bf16=editor_step(bb, True), unfused=editor_step(unfused(bb), True)))
    print(f"{'':34s} {'fp32 s/step':>11} {'bf16 s/step':>11} {'bf16/fp32':>9} {'unfused bf16/fp32':>18}")
    vae, editor = f"VAE (batch {vc.batch}, {vc.crop}²)", f"editor (batch {ec.batch}, 3×{(ec.size // 16) ** 2} tokens)"
    print(f"{vae:34s} {v['fp32']:11.3f} {v['bf16']:11.3f} {v['bf16'] / v['fp32']:9.2f}")
    ratios = f"{e['bf16'] / e['fp32']:9.2f} {e['unfused'] / e['fp32']:18.2f}"
    print(f"{editor:34s} {e['fp32']:11.3f} {e['bf16']:11.3f} {ratios}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", action="store_true", help="first, the editor's bf16 step by op (torch.profiler)")
    main(ap.parse_args().profile)
