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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--adapter", default="freqmole", choices=["freqmole", "lora"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens per picture (1024x1024 = 4096)")
    ap.add_argument("--refs", type=int, default=1, help="reference images in the sequence")
    ap.add_argument("--batch", type=int, default=1, help="per GPU")
    a = ap.parse_args()
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
