"""The one-command GPU check (`make gpu-check`): on one H100/H200-class GPU, in at most ~10 minutes, with the real
FLUX.1-Kontext weights when a pipeline folder is given (--folder) and a FLUX.1-sized random transformer otherwise:

- sampling at 1024²: labkit's denoising loop (Backbone + labkit.sampling's schedule) against the same loop written
  plainly on the diffusers transformer (with --folder: labkit.generate against FluxKontextPipeline, same settings);
- one Kontext LoRA training step: labkit's (labkit.adapters, fp32 adapters, bf16 autocast, checkpointing) against
  a plain diffusers + peft step;
- peak memory of each, per memory option (gradient checkpointing on/off), and the model FLOP utilisation (MFU).

It prints one table and writes JSON (--out). Without CUDA it says so and exits 0 having done nothing; --tiny
--device cpu runs the same code on the tiny config (what the test suite checks).

    python bench/gpu_check.py [--folder DIR] [--size 1024] [--steps 28] [--rank 16] [--out runs/gpu_check.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense bf16


def transformer_flops(cfg: dict, seq: int, txt: int) -> float:
    """Forward FLOPs of a FLUX transformer on `seq` image + `txt` text tokens: 2 x (matmul weights) x tokens plus
    attention (4 x S² x width per block), from the config (an estimate: norms, RoPE and activations left out)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    s = seq + txt
    double = cfg["num_layers"] * (2 * (4 * d * d + 2 * 4 * d * d) + 2 * 6 * d * d)  # attn + MLP + adaLN, two streams
    single = cfg["num_single_layers"] * (3 * d * d + 4 * d * d + 5 * d * d + 3 * d * d)  # qkv, mlp in, out, adaLN
    attn = (cfg["num_layers"] + cfg["num_single_layers"]) * 4 * s * s * d
    return 2.0 * (double + single) * s + attn


def peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak (TFLOP/s) from its name, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def timed(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """(seconds per call after one warm-up, peak memory in GiB; 0 on CPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    fn(), sync()
    t0 = time.time()
    for _ in range(reps):
        fn()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return (time.time() - t0) / reps, peak


def random_transformer(cfg: dict, device: torch.device, dtype: torch.dtype):
    """A FLUX transformer of this config with random weights, built on the meta device then materialised."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device("meta"):
        t = FluxTransformer2DModel(**cfg)
    t = t.to_empty(device=device).to(dtype)
    for p in t.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return t.requires_grad_(False).eval()


def inputs(cfg: dict, side: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Latents (target and one context) of a side x side image, and random text embeddings of FLUX's shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = side // 8
    return dict(
        x=torch.randn(1, 16, lat, lat, generator=g).to(device),
        ctx=torch.randn(1, 16, lat, lat, generator=g).to(device),
        txt=(
            torch.randn(1, 512, cfg["joint_attention_dim"], generator=g).to(device, dtype),
            torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
            torch.zeros(512, 3, device=device),
        ),
    )


def sampling(bb, t, inp: dict, steps: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Two Euler loops over the same schedule: labkit's Backbone call vs the plain diffusers transformer call."""
    from labkit import sampling as S
    from labkit.models import Backbone

    x, ctx, txt = inp["x"], inp["ctx"], inp["txt"]
    n_tok = x.shape[-2] * x.shape[-1] // 4
    ts = S.times(bb, steps, n_tok).to(device)
    side = x.shape[-1]
    ids = torch.cat([Backbone.image_ids(side, side, 0, device), Backbone.image_ids(side, side, 1, device)])
    guid = torch.full((1,), 2.5, device=device) if t.config.guidance_embeds else None

    @torch.no_grad()
    def ours():
        z = x.clone()
        for a, b in zip(ts[:-1], ts[1:]):
            with torch.autocast(device.type, dtype=dtype):
                v = bb(z, a.reshape(1), [ctx], prompt_embeds=txt, guidance=2.5 if guid is not None else None)
            z = z + (b - a) * v.float()
        return z

    @torch.no_grad()
    def plain():
        z = Backbone.pack(x.clone())
        c = Backbone.pack(ctx)
        for a, b in zip(ts[:-1], ts[1:]):
            with torch.autocast(device.type, dtype=dtype):
                out = t(hidden_states=torch.cat([z, c], 1).to(dtype), encoder_hidden_states=txt[0],
                        pooled_projections=txt[1], timestep=a.reshape(1), img_ids=ids, txt_ids=txt[2],
                        guidance=guid, return_dict=False)[0]  # fmt: skip
            z = z + (b - a) * out[:, : z.shape[1]].float()
        return z

    return dict(plain=timed(plain, device, 1), labkit=timed(ours, device, 1))


def lora_step(make_t, bb_of, inp: dict, rank: int, device: torch.device, dtype: torch.dtype, gc: bool) -> dict:
    """One LoRA training step: labkit's adapters through the Backbone vs diffusers' add_adapter (peft), the
    adapters fp32 and the forward under bf16 autocast in both; gc: gradient checkpointing."""
    from peft import LoraConfig

    from labkit import adapters as AD
    from labkit.models import Backbone

    x, ctx, txt = inp["x"], inp["ctx"], inp["txt"]
    half = torch.full((1,), 0.5, device=device)

    def prepared(t):
        for p in t.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if gc:
            t.enable_gradient_checkpointing()
        return torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], 1e-4)

    def labkit_step():
        t = make_t()
        AD.inject(t, "lora", rank=rank)
        opt, bb = prepared(t), bb_of(t)
        guid = 2.5 if t.config.guidance_embeds else None

        def f():
            with torch.autocast(device.type, dtype=dtype):
                v = bb(x, half, [ctx], prompt_embeds=txt, guidance=guid)
            v.float().pow(2).mean().backward()
            opt.step(), opt.zero_grad(set_to_none=True)

        return f

    def plain_step():
        t = make_t()
        t.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=AD.TARGETS, init_lora_weights="gaussian"))
        opt = prepared(t)
        tokens = torch.cat([Backbone.pack(x), Backbone.pack(ctx)], 1).to(dtype)
        side = x.shape[-1]
        ids = torch.cat([Backbone.image_ids(side, side, 0, device), Backbone.image_ids(side, side, 1, device)])
        guid = torch.full((1,), 2.5, device=device) if t.config.guidance_embeds else None

        def f():
            with torch.autocast(device.type, dtype=dtype):
                out = t(hidden_states=tokens, encoder_hidden_states=txt[0], pooled_projections=txt[1], timestep=half,
                        img_ids=ids, txt_ids=txt[2], guidance=guid, return_dict=False)[0]  # fmt: skip
            out[:, : tokens.shape[1] // 2].float().pow(2).mean().backward()
            opt.step(), opt.zero_grad(set_to_none=True)

        return f

    return {name: timed(make(), device, 2) for name, make in (("plain", plain_step), ("labkit", labkit_step))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default=None, help="a FluxKontextPipeline folder (real weights); else random weights")
    ap.add_argument("--tiny", action="store_true", help="the tiny config instead of FLUX.1's (a quick check)")
    ap.add_argument("--device", default="auto", help="auto (CUDA, else do nothing) | cuda | cpu")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=28, help="sampling steps (FluxKontextPipeline's default)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="runs/gpu_check.json")
    a = ap.parse_args(argv)
    if a.device == "auto" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; it needs one H100/H200-class GPU (nothing was run)")
        return 0
    import labkit
    from labkit import presets as P
    from labkit.models import Backbone

    device = torch.device("cuda" if a.device == "auto" else a.device)
    dtype = torch.bfloat16
    if a.folder:
        bb = labkit.load(a.folder, device=str(device))
        cfg, make_t = dict(bb.transformer.config), lambda: bb.transformer  # noqa: E731
    else:
        cfg = dict(P.get("tiny").transformer) if a.tiny else dict(P.FLUX_KONTEXT_TRANSFORMER)
        make_t = lambda: random_transformer(cfg, device, dtype)  # noqa: E731
        bb = Backbone(P.get("tiny" if a.tiny else "flux-kontext"), make_t(), torch.nn.Identity(), None)
    bb_of = lambda t: Backbone(bb.preset, t, torch.nn.Identity(), None)  # noqa: E731
    inp = inputs(cfg, a.size, device, dtype)
    seq = 2 * (a.size // 16) ** 2
    flops = transformer_flops(cfg, seq, 512)
    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights = a.folder or ("random tiny" if a.tiny else "random FLUX.1-sized")
    res = dict(device=name, size=a.size, weights=weights, forward_tflop=flops / 1e12)
    res["sampling"] = sampling(bb, bb.transformer, inp, a.steps, device, dtype)
    res["lora_step"] = {
        f"checkpointing {gc}": lora_step(make_t, bb_of, inp, a.rank, device, dtype, gc) for gc in (True, False)
    }
    rows = [("sampling", k, *v, a.steps * flops / v[0]) for k, v in res["sampling"].items()]
    rows += [(f"LoRA step ({g})", k, *v, 3 * flops / v[0]) for g, d in res["lora_step"].items() for k, v in d.items()]
    print(f"gpu-check on {res['device']}: {res['weights']} weights, {a.size}² ({seq} image tokens + 512 text)")
    print(f"{'what':32s} {'path':7s} {'seconds':>9s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for what, path, s, mem, fl in rows:
        mfu = f"{fl / 1e12 / peak:.1%}" if peak else "n/a"
        print(f"{what:32s} {path:7s} {s:9.3f} {mem:9.2f} {fl / 1e12:8.1f} {mfu:>6s}")
    res["table"] = [dict(what=w, path=p, seconds=s, peak_gib=m, tflops=f / 1e12, mfu=f / 1e12 / peak if peak else None)
                    for w, p, s, m, f in rows]  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
