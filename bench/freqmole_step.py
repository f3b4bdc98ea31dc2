"""Training-step time of FreqMoLE ÷ peft LoRA at equal rank (goal ≤ 1.15) and ÷ the frozen model's own
forward + backward, on the mini editor config, measured interleaved in one run."""

import time

import torch

import labkit
from labkit import adapters as AD


def step_fn(bb, x, c):
    params = [p for p in bb.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4) if params else None

    def f():
        v = bb(x, torch.full((x.shape[0],), 0.5), [c, c], prompt="restore")
        v.pow(2).mean().backward()
        if opt:
            opt.step(), opt.zero_grad()

    return f


def main(rank: int = 8, batch: int = 8, reps: int = 5) -> None:
    x, c = torch.randn(batch, 16, 16, 16), torch.randn(batch, 16, 16, 16)
    runs = {}
    for kind in ("frozen", "lora", "freqmole"):
        bb = labkit.load("mini", weights=None)
        bb.transformer.requires_grad_(False)  # frozen: forward + backward to the input only
        if kind != "frozen":
            AD.inject(bb.transformer, kind, rank=rank)
        runs[kind] = step_fn(bb, x.clone().requires_grad_(kind == "frozen"), c)
        runs[kind]()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    t = {k: min(v) for k, v in times.items()}
    print(f"mini editor, batch {batch}, 3x{16 * 16 // 4} tokens, rank {rank}")
    for k in t:
        print(f"  {k:9s} {t[k]:.3f} s/step")
    print(f"  FreqMoLE / LoRA (equal rank)      {t['freqmole'] / t['lora']:.2f}   (goal <= 1.15)")
    print(f"  FreqMoLE / frozen forward+backward {t['freqmole'] / t['frozen']:.2f}")


if __name__ == "__main__":
    main()
