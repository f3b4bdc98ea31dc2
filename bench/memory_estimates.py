"""Memory per GPU for FLUX.1-Kontext LoRA / FreqMoLE training under each way of spreading it (README "Past one
machine"), computed from the real config, nothing typed in but the config and the card sizes compared with:

- parameter counts: the real transformer built on the meta device (no memory), adapters injected as labkit trains them;
- activation bytes per token: the tensors autograd saves for backward (counted with saved_tensors_hooks, shared
  storage once) in one real-width double block and one single block, bf16 autocast, at three sequence lengths;
  a quadratic fit splits the per-token part (what flash attention keeps, as on GPUs) from the N² attention matrix
  a math-attention backend would add (reported, not counted);
- the settings: 1 GPU and DDP over N (every GPU holds the frozen bf16 base + fp32 adapter, gradient and AdamW
  moments), FSDP over N GPUs and over 2 nodes x N (base and adapter state sharded, one block gathered at a time
  plus the prefetched next one), each without and with gradient checkpointing (only block inputs kept).
Prompts are encoded once and the reference/target latents pre-encoded (labkit's SFT banks), so T5/CLIP and the
VAE are not resident during training.

    python bench/memory_estimates.py [--gpus 8] [--adapter freqmole] [--rank 16] [--tokens 4096] [--refs 1] [--batch 1]

--plan: the memory plan of one card (README "Memory plan"): for inference and for adapter training, at 512² and
1024², the bytes of each of labkit.load's memory options (prompts cached and the text encoders freed, a quantized
transformer, model / sequential CPU offload) and the first option set, least intrusive first, that fits 24, 48
and 80 GB. The text encoders' and the VAE's sizes are counted from their public configs on the meta device.
"""

import argparse
import sys

import numpy as np
import torch

GIB = 2**30
CARDS = (24, 40, 48, 80, 141)  # GB of the common cards the table is compared with


def build(layers: int, single: int, device: str = "meta"):
    """The real transformer at a chosen depth (real width), on `device` (meta: shapes only)."""
    from diffusers import FluxTransformer2DModel

    from labkit.presets import FLUX_KONTEXT_TRANSFORMER

    with torch.device("meta"):
        t = FluxTransformer2DModel(**dict(FLUX_KONTEXT_TRANSFORMER, num_layers=layers, num_single_layers=single))
    return t if device == "meta" else t.to_empty(device=device).to(torch.bfloat16)


def counts(adapter: str, rank: int) -> dict:
    """Parameters of the full transformer, of its adapters, and of its largest FSDP unit (one block)."""
    from labkit import adapters as AD
    from labkit.presets import FLUX_KONTEXT_TRANSFORMER as C

    t = build(C["num_layers"], C["num_single_layers"])
    AD.inject(t, adapter, rank=rank)
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    return dict(
        base=n(p for p in t.parameters() if not p.requires_grad),
        adapter=n(p for p in t.parameters() if p.requires_grad),
        unit=max(n(b.parameters()) for b in blocks),
        double=C["num_layers"],
        single=C["num_single_layers"],
        hidden=C["num_attention_heads"] * C["attention_head_dim"],
    )


def saved_bytes(t, tokens: int, txt: int = 64) -> int:
    """Bytes autograd saves for backward in one forward of t on `tokens` image tokens + `txt` text tokens."""
    from labkit.models import Backbone

    side = int(round(tokens**0.5))
    x = torch.randn(1, side * side, 64, dtype=torch.bfloat16, requires_grad=True)
    ids = Backbone.image_ids(side * 2, side * 2, 0, "cpu")
    seen: dict = {}

    def pack(v):
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            s = v.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v), torch.autocast("cpu", dtype=torch.bfloat16):
        t(
            hidden_states=x,
            encoder_hidden_states=torch.randn(1, txt, 4096, dtype=torch.bfloat16),
            pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16),
            timestep=torch.full((1,), 0.5),
            img_ids=ids,
            txt_ids=torch.zeros(txt, 3),
            guidance=torch.full((1,), 2.5),
            return_dict=False,
        )
    return sum(seen.values())


def per_token(adapter: str, rank: int, lengths=(64, 144, 256)) -> dict:
    """Saved-activation bytes per token of one double and one single block (linear part of a quadratic fit in
    the sequence length), and the quadratic coefficient (math attention's N² matrix)."""
    from labkit import adapters as AD

    out = {}
    models = {(1, 0): None, (2, 0): None, (1, 1): None}
    for key in models:
        m = build(*key, device="cpu")
        AD.inject(m, adapter, rank=rank)
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        models[key] = [saved_bytes(m, n) for n in lengths]
        del m
    seq = np.array(lengths) + 64  # image + text tokens
    for name, (a, b) in dict(double=((2, 0), (1, 0)), single=((1, 1), (1, 0))).items():
        diff = np.array(models[a], float) - np.array(models[b], float)
        c2, c1, _ = np.polyfit(seq, diff, 2)
        out[name], out[f"{name}_quadratic"] = (
            float(c1 + 2 * c2 * seq.mean()) if c2 < 0 else float(c1),
            float(max(c2, 0.0)),
        )
    return out


def estimates(c: dict, act: dict, tokens: int, refs: int, batch: int, gpus: int) -> list[dict]:
    """GB per GPU for each setting, without and with gradient checkpointing."""
    seq = tokens * (2 + refs) + 512  # target + draft + references (image tokens) + T5 text tokens
    base, adapter = 2 * c["base"], 16 * c["adapter"]  # bf16 frozen; fp32 weight + grad + AdamW m, v
    full = batch * seq * (c["double"] * act["double"] + c["single"] * act["single"])
    ckpt = batch * seq * (2 * c["hidden"] * (c["double"] * 2 + c["single"]) + max(act["double"], act["single"]))
    unit = 2 * 2 * c["unit"]  # FSDP: the gathered block and the prefetched next one, bf16
    rows = []
    for name, world, shard in (
        ("1 GPU", 1, False),
        (f"DDP 1x{gpus}", gpus, False),
        (f"FSDP 1x{gpus}", gpus, True),
        (f"FSDP 2x{gpus} (2 nodes)", 2 * gpus, True),
    ):
        states = (
            (base + adapter) / world + unit if shard else base + adapter + (4 * c["adapter"] if world > 1 else 0)
        )  # DDP buckets
        rows.append(
            dict(
                setting=name,
                world=world,
                states_gb=states / GIB,
                no_ckpt_gb=(states + full) / GIB,
                ckpt_gb=(states + ckpt) / GIB,
            )
        )
    return rows


# the public configs of FLUX.1-Kontext-dev's other components (text_encoder_2 = T5-v1.1-XXL's encoder, text_encoder =
# CLIP ViT-L/14's text tower, the 16-channel VAE), counted on the meta device
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)
PLAN_CARDS = (24, 48, 80)
BYTES_PER = dict(bf16=2.0, int8=1.0 + 1 / 64, nf4=0.5 + 1 / 32)  # weight bytes per parameter (+ block scales)


def component_params() -> dict:
    """Parameters of the pipeline's text encoders and VAE, from their configs on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        mods = dict(t5=T5EncoderModel(T5Config(**T5_XXL)), clip=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                    vae=AutoencoderKL(**FLUX_VAE))  # fmt: skip
    return {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}


def plan_rows(c: dict, act: dict, comp: dict, tokens: int) -> list[dict]:
    """GiB on one card for each option set, inference and adapter training, least intrusive first."""
    seq = 2 * tokens + 512  # target + one context + text
    text = 2 * (comp["t5"] + comp["clip"])  # bf16
    vae = 2 * comp["vae"] + 3 * 4 * (8 * int(tokens**0.5) * 2) ** 2 * 64  # weights + a decoder activation at full res
    infer_act = 16 * seq * c["hidden"] * 2  # one block's live tensors at a time (no grad), bf16, flash attention
    train_act = seq * (2 * c["hidden"] * (c["double"] * 2 + c["single"]) + max(act["double"], act["single"]))
    adapter = 16 * c["adapter"]  # fp32 weight + grad + AdamW m, v
    rows = []
    for fmt in ("bf16", "int8", "nf4"):
        t = BYTES_PER[fmt] * c["base"]
        q = "" if fmt == "bf16" else f", quantize={'int8' if fmt == 'int8' else 'nf4'}"
        rows.append(dict(use="inference", options=f"cache_prompts{q}", gib=(t + vae + infer_act) / GIB))
        if fmt == "bf16":
            rows.insert(0, dict(use="inference", options="none", gib=(t + text + vae + infer_act) / GIB))
        rows.append(dict(use="adapter training", options=f"cached prompts + latents, checkpointing{q}",
                         gib=(t + adapter + train_act) / GIB))  # fmt: skip
    rows.append(dict(use="inference", options="offload=model", gib=(2 * max(c["base"], comp["t5"]) + infer_act) / GIB))
    rows.append(dict(use="inference", options="offload=sequential", gib=(2 * 2 * c["unit"] + infer_act) / GIB))
    return rows


def plan(a) -> int:
    """Print the memory plan: per use and resolution, the option sets and the first that fits each card."""
    c, act, comp = counts(a.adapter, a.rank), per_token(a.adapter, a.rank), component_params()
    print(f"components: transformer {c['base'] / 1e9:.2f}B, T5 encoder {comp['t5'] / 1e9:.2f}B, CLIP text "
          f"{comp['clip'] / 1e6:.0f}M, VAE {comp['vae'] / 1e6:.0f}M; {a.adapter} rank {a.rank}\n")  # fmt: skip
    print(f"{'use':17s} {'side':>5s}  {'options':52s} {'GiB':>6s}   " + "  ".join(f"{g} GB" for g in PLAN_CARDS))
    for side in (512, 1024):
        rows = plan_rows(c, act, comp, (side // 16) ** 2)
        for r in rows:
            fits = ["yes" if r["gib"] * GIB < g * 1e9 * 0.92 else "-" for g in PLAN_CARDS]
            print(
                f"{r['use']:17s} {side:5d}  {r['options']:52s} {r['gib']:6.1f}   " + "  ".join(f"{f:>5s}" for f in fits)
            )
        for use in ("inference", "adapter training"):
            need = []
            for g in PLAN_CARDS:
                ok = [r["options"] for r in rows if r["use"] == use and r["gib"] * GIB < g * 1e9 * 0.92]
                need.append(f"{g} GB: {ok[0] if ok else 'does not fit'}")
            print(f"  -> {use} at {side}²: " + "; ".join(need))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--adapter", default="freqmole", choices=["freqmole", "lora"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens per picture (1024x1024 = 4096)")
    ap.add_argument("--refs", type=int, default=1, help="reference images in the sequence")
    ap.add_argument("--batch", type=int, default=1, help="per GPU")
    ap.add_argument("--plan", action="store_true", help="the one-card memory plan (inference and training options)")
    a = ap.parse_args()
    if a.plan:
        return plan(a)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    c = counts(a.adapter, a.rank)
    act = per_token(a.adapter, a.rank)
    print(
        f"FLUX.1-Kontext transformer: {c['base'] / 1e9:.2f}B frozen parameters, {a.adapter} rank {a.rank}: "
        f"{c['adapter'] / 1e6:.1f}M trainable; largest FSDP unit {c['unit'] / 1e6:.0f}M"
    )
    print(
        f"saved activations per token (bf16, measured): double block {act['double'] / 1024:.1f} KiB, single block "
        f"{act['single'] / 1024:.1f} KiB (+{act['double_quadratic']:.0f} / {act['single_quadratic']:.0f} bytes "
        "x N² with math attention)"
    )
    seq = a.tokens * (2 + a.refs) + 512
    print(
        f"sequence: {a.tokens} target + {a.tokens} draft + {a.refs} x {a.tokens} reference + 512 text = {seq} "
        f"tokens, batch {a.batch}/GPU\n"
    )
    print(
        f"{'setting':26s} {'weights+adapter state':>22s} {'no checkpointing':>17s} "
        f"{'grad. checkpointing':>20s}   fits (ckpt) on"
    )
    for r in estimates(c, act, a.tokens, a.refs, a.batch, a.gpus):
        fits = ", ".join(f"{g} GB" for g in CARDS if r["ckpt_gb"] * GIB < g * 1e9 * 0.92) or "none listed"
        print(
            f"{r['setting']:26s} {r['states_gb']:19.1f} GiB {r['no_ckpt_gb']:13.1f} GiB {r['ckpt_gb']:16.1f} "
            f"GiB   {fits}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
