"""Seconds per training step of the mini VAE and the mini editor at their recipe's batch and sizes,
measured side by side in one run (fp32 vs bf16 autocast too: bf16 only helps on CPUs with native bf16)."""

import time

import numpy as np
import torch
import torch.nn.functional as F

from labkit import data as D
from labkit import models as M
from labkit import presets as P
from labkit.pretrain import EditorConfig
from labkit.vae import VAEConfig


def timed(step, reps: int = 4) -> float:
    step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    bb = M.build(P.get("mini", weights=None))
    vc, ec = VAEConfig(), EditorConfig()
    x = D.crop_batch(np.random.default_rng(0), "train", vc.batch, vc.crop)
    vopt = torch.optim.AdamW(bb.vae.parameters(), 1e-3)
    topt = torch.optim.AdamW(bb.transformer.parameters(), 1e-3)
    n = ec.size // 8
    z = [torch.randn(ec.batch, 16, n, n) for _ in range(3)]

    def vae_step(bf16: bool):
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                rec = bb.vae.decode(bb.vae.encode(x * 2 - 1).latent_dist.mode()).sample
                loss = F.l1_loss(rec.float(), x * 2 - 1)
            loss.backward(), vopt.step(), vopt.zero_grad()

        return f

    def editor_step(bf16: bool):
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                v = bb(z[0], torch.rand(ec.batch), z[1:], prompt="restore")
                loss = (v.float() ** 2).mean()
            loss.backward(), topt.step(), topt.zero_grad()

        return f

    print(f"threads: {torch.get_num_threads()}")
    print(f"{'':34s} {'fp32 s/step':>11} {'bf16 s/step':>11} {'bf16/fp32':>9}")
    for name, mk in [
        (f"VAE (batch {vc.batch}, {vc.crop}²)", vae_step),
        (f"editor (batch {ec.batch}, 3×{(ec.size // 16) ** 2} tokens)", editor_step),
    ]:
        a, b = timed(mk(False)), timed(mk(True), reps=2)
        print(f"{name:34s} {a:11.3f} {b:11.3f} {b / a:9.2f}")


if __name__ == "__main__":
    main()
