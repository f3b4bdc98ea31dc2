"""Attention capture overhead: time of a forward with the streaming M* capture ÷ a plain forward, side by
side in one run, at growing sequence lengths (goal ≤ 1.3×), and the capture's memory: what it stores
(O(T·L·N_ref)) and its largest transient block (B·H·chunk·N floats) next to a naive full-probability capture."""

import argparse
import time

import torch

import labkit
from labkit import attention as AT


def bench(bb, side: int, reps: int, chunk: int) -> dict:
    z = torch.randn(1, 16, side // 8, side // 8)
    n_tok = (side // 16) ** 2
    mask = torch.zeros(1, side, side)
    mask[:, side // 4 : side // 2, side // 4 : side // 2] = 1
    spec = AT.CaptureSpec(
        queries={"target": AT.tokens_in_mask(mask, 16), "draft": AT.tokens_in_mask(mask, 16, n_tok)},
        ref=slice(2 * n_tok, 3 * n_tok),
        chunk=chunk,
    )
    emb = bb.encode_prompt("restore")

    def plain():
        bb(z, 0.5, [z, z], prompt_embeds=emb)

    def captured():
        with AT.capture(bb.transformer, spec, n_image=3 * n_tok):
            bb(z, 0.5, [z, z], prompt_embeds=emb)

    for f in (plain, captured):
        f()
    times = {"plain": [], "captured": []}
    for _ in range(reps):  # interleaved so drift hits both
        for name, f in (("plain", plain), ("captured", captured)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    tp, tc = min(times["plain"]), min(times["captured"])
    n = 3 * n_tok + emb[0].shape[1]
    heads = bb.transformer.config.num_attention_heads
    n_blocks = len(bb.transformer.attn_processors)
    return dict(
        tokens=n,
        plain_ms=1e3 * tp,
        captured_ms=1e3 * tc,
        ratio=tc / tp,
        stored_kib=2 * n_blocks * n_tok * 4 / 1024,
        transient_kib=heads * min(chunk, len(spec.queries["target"])) * n * 4 / 1024,
        naive_full_kib=n_blocks * heads * n * n * 4 / 1024,
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--sides", default="128,256,384")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256)
    a = ap.parse_args()
    bb = labkit.load(a.preset)
    print(
        f"{'tokens':>7} {'plain ms':>9} {'capture ms':>10} {'ratio':>6} {'stored KiB':>10} "
        f"{'transient KiB':>13} {'naive full KiB':>14}"
    )
    for side in map(int, a.sides.split(",")):
        r = bench(bb, side, a.reps, a.chunk)
        print(
            f"{r['tokens']:7d} {r['plain_ms']:9.1f} {r['captured_ms']:10.1f} {r['ratio']:6.2f} {r['stored_kib']:10.1f} "
            f"{r['transient_kib']:13.1f} {r['naive_full_kib']:14.1f}"
        )
