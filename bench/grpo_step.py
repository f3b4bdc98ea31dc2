"""One GRPO step on the mini config, split into sampling (G SDE samples + decode + reward) and update
(policy forwards over the trained steps + backward + AdamW), measured side by side in one run."""

import time

import numpy as np
import torch

import labkit
from labkit import adapters as AD
from labkit import data as D
from labkit import rl


def main(group: int = 8, inputs: int = 2, sample_steps: int = 6, train_frac: float = 0.5, reps: int = 3) -> None:
    bb = labkit.load("mini")
    AD.inject(bb.transformer, "freqmole", rank=4)
    params = [p for n, p in bb.transformer.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, 1e-4)
    cfg = rl.GRPOConfig(group=group, inputs=inputs, sample_steps=sample_steps, train_frac=train_frac)
    reward = rl.make_reward()
    cases = [D.make_triplet(i, "train", cfg.size, cfg.factor) for i in range(inputs)]
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    t_sample, t_update = [], []
    for rep in range(reps + 1):  # the first repetition warms up
        t0 = time.perf_counter()
        rolls = [rl.rollout(bb, c, rl.contexts(bb, c, 1, cfg.size**2), cfg, reward, gen) for c in cases]
        t1 = time.perf_counter()
        loss, _ = rl.grpo_loss(bb, rolls, cfg, rng)
        loss.backward()
        opt.step(), opt.zero_grad()
        t2 = time.perf_counter()
        if rep:
            t_sample.append(t1 - t0), t_update.append(t2 - t1)
    s, u = float(np.median(t_sample)), float(np.median(t_update))
    print(
        f"GRPO step on mini (G={group}, inputs={inputs}, {sample_steps} SDE steps, {train_frac:.0%} trained), "
        f"{torch.get_num_threads()} threads:"
    )
    print(f"  sampling  {s:6.2f} s  ({s / (s + u):.0%})")
    print(f"  update    {u:6.2f} s  ({u / (s + u):.0%})")
    print(f"  update / sampling = {u / s:.2f}")


if __name__ == "__main__":
    main()
