"""FLUX.1-Kontext-size adapter SFT step: labkit's (Backbone + labkit.adapters LoRA + the loop's precision rules:
bf16 frozen weights, fp32 adapters, bf16 autocast, gradient checkpointing) vs the same LoRA step written plainly
with diffusers + peft (as diffusers' Kontext LoRA script does), on a random-init transformer with the real config.
Prints step time and peak GPU memory of each and their ratio, measured interleaved in one run.

Needs a CUDA GPU with ~40 GB (the 12B transformer in bf16); on CPU it says so and exits.
    python bench/flux_sft_step.py [--tokens 4096] [--rank 16] [--reps 5]
"""

import argparse
import sys
import time

import torch

from labkit.presets import FLUX_KONTEXT_TRANSFORMER as REAL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tokens", type=int, default=4096, help="target tokens (1024x1024 = 4096); the context doubles the sequence"
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench/flux_sft_step.py: needs a CUDA GPU (a 12B transformer in bf16, ~40 GB); skipped on this CPU machine."
        )
        return
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from labkit import adapters as AD
    from labkit.models import Backbone
    from labkit.presets import get

    dev, side = torch.device("cuda"), int(a.tokens**0.5) * 2  # latent side

    def build():
        torch.manual_seed(0)
        with torch.device("meta"):
            t = FluxTransformer2DModel(**REAL)
        t = t.to_empty(device=dev).to(torch.bfloat16)
        for p in t.parameters():
            torch.nn.init.normal_(p, std=0.02)
        return t.requires_grad_(False)

    x = torch.randn(1, 16, side, side, device=dev)
    ctx = torch.randn(1, 16, side, side, device=dev)
    txt = (
        torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16),
        torch.randn(1, 768, device=dev, dtype=torch.bfloat16),
        torch.zeros(512, 3, device=dev),
    )

    def labkit_step():
        t = build()
        AD.inject(t, "lora", rank=a.rank)
        for p in t.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # the loop's cast_training_params
        t.enable_gradient_checkpointing()
        bb = Backbone(get("flux-kontext"), t, torch.nn.Identity(), None)
        opt = torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], 1e-4)

        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                v = bb(x, torch.full((1,), 0.5, device=dev), [ctx], prompt_embeds=txt, guidance=2.5)
            v.float().pow(2).mean().backward()
            opt.step(), opt.zero_grad(set_to_none=True)

        return f

    def plain_step():
        t = build()
        t.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=AD.TARGETS, init_lora_weights="gaussian"))
        for p in t.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        t.enable_gradient_checkpointing()
        opt = torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], 1e-4)
        tokens = torch.cat([Backbone.pack(x), Backbone.pack(ctx)], 1).to(torch.bfloat16)
        ids = torch.cat([Backbone.image_ids(side, side, 0, dev), Backbone.image_ids(side, side, 1, dev)])

        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = t(
                    hidden_states=tokens,
                    encoder_hidden_states=txt[0],
                    pooled_projections=txt[1],
                    timestep=torch.full((1,), 0.5, device=dev),
                    img_ids=ids,
                    txt_ids=txt[2],
                    guidance=torch.full((1,), 2.5, device=dev),
                    return_dict=False,
                )[0]
            out[:, : tokens.shape[1] // 2].float().pow(2).mean().backward()
            opt.step(), opt.zero_grad(set_to_none=True)

        return f

    res = {}
    for name, make in (("plain diffusers+peft", plain_step), ("labkit", labkit_step)):
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        f = make()
        f(), torch.cuda.synchronize()  # warm-up
        t0 = time.time()
        for _ in range(a.reps):
            f()
        torch.cuda.synchronize()
        res[name] = ((time.time() - t0) / a.reps, torch.cuda.max_memory_allocated() / 2**30)
        del f
    print(
        f"FLUX-size LoRA SFT step, rank {a.rank}, {a.tokens} target + {a.tokens} context tokens, "
        f"{torch.cuda.get_device_name()}"
    )
    for k, (s, m) in res.items():
        print(f"  {k:24s} {s:7.3f} s/step   peak {m:6.1f} GiB")
    (s0, m0), (s1, m1) = res["plain diffusers+peft"], res["labkit"]
    print(f"  labkit / plain: time x{s1 / s0:.3f}, peak memory x{m1 / m0:.3f}")


if __name__ == "__main__":
    sys.exit(main())
