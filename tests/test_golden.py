"""A golden test on mini: a fixed `labkit.refine` call must keep producing the committed image.

It pins the whole path (mini weights, input handling, Focus crop, the sampler and its scheduler, paste back).
A change that moves it on purpose regenerates the PNG and says why in the commit:
    LABKIT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""
import os
from pathlib import Path

import numpy as np
from PIL import Image

import labkit
from labkit import data as D
from labkit import metrics
from labkit.inference import to_pil

GOLDEN = Path(__file__).parent / "golden"
CALLS = {  # name -> the fixed call's arguments (a held-out test triplet; LRGI draft, HRRI reference)
    "refine_focus_mini": dict(method="focus", steps=4, seed=0),
    "refine_full_mini": dict(method="full", steps=4, seed=0),
}


def _call(name: str) -> Image.Image:
    c = D.make_triplet(3, "test", 128, 2, degradation="blur")
    return labkit.refine(to_pil(c.draft), c.mask[0].numpy(), to_pil(c.hrri), preset="mini", **CALLS[name])


def test_fixed_refine_calls_reproduce_the_committed_images():
    for name in CALLS:
        out, path = _call(name), GOLDEN / f"{name}.png"
        if os.environ.get("LABKIT_UPDATE_GOLDEN"):
            out.save(path)
        ref = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
        got = np.asarray(out, np.float32) / 255
        psnr = float(metrics.psnr(D.to_tensor(got)[None], D.to_tensor(ref)[None]))
        assert psnr > 45, f"{name}: {psnr:.1f} dB from the committed output (regenerate on purpose: see the module docstring)"
