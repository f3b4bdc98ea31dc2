"""A golden test on mini: fixed `labkit.refine` calls must keep producing the committed images.

It pins the whole path (mini weights, input handling, registration, Focus crop, region encoding, the sampler
and its scheduler, paste back) and labkit.refine's defaults, which notebook 05 chooses on val.
A change that moves it on purpose regenerates the PNGs (that run compares nothing: it only writes) and says
why in the commit:
    LABKIT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import labkit
from labkit import data as D
from labkit import images as IM
from labkit import metrics
from labkit.inference import REFINE_DEFAULTS, to_pil
from labkit.util import REPO

GOLDEN = Path(__file__).parent / "golden"
# name -> the fixed call's arguments (a held-out test case: a wrong word/glyph, the reference in another view)
CALLS = {
    "refine_default_mini": dict(steps=4, seed=0),  # the defaults chosen on val
    "refine_focus_mini": dict(method="focus", steps=4, seed=0),
    "refine_full_mini": dict(method="full", steps=4, seed=0),
}


def _case():
    return D.make_triplet(3, "test", 128, 1, failure="wrong", view_strength=0.4)


def _call(name: str) -> Image.Image:
    c = _case()
    return labkit.refine(to_pil(c.draft), c.mask[0].numpy(), to_pil(c.reference), preset="mini", **CALLS[name])


def test_fixed_refine_calls_reproduce_the_committed_images():
    if os.environ.get("LABKIT_UPDATE_GOLDEN"):
        for name in CALLS:
            _call(name).save(GOLDEN / f"{name}.png")
        pytest.skip("LABKIT_UPDATE_GOLDEN: the golden images were rewritten, nothing compared")
    for name in CALLS:
        out = _call(name)
        ref = np.asarray(Image.open(GOLDEN / f"{name}.png").convert("RGB"), np.float32) / 255
        got = np.asarray(out, np.float32) / 255
        psnr = float(metrics.psnr(IM.to_tensor(got)[None], IM.to_tensor(ref)[None]))
        assert psnr > 45, (
            f"{name}: {psnr:.1f} dB from the committed output (regenerate on purpose: see the module docstring)"
        )


def test_the_default_call_keeps_the_background_and_is_the_val_winner():
    c = _case()
    out = IM.to_tensor(np.asarray(_call("refine_default_mini"), np.float32) / 255)
    draft = IM.to_tensor(np.asarray(to_pil(c.draft), np.float32) / 255)
    x0, y0, x1, y1 = c.bbox
    outside = np.ones(draft.shape[-2:], bool)
    outside[max(0, y0 - 40) : y1 + 40, max(0, x0 - 40) : x1 + 40] = False  # generously beyond the focus box
    assert float((out - draft).abs()[:, outside].max()) == 0.0  # every pixel outside the box kept
    chosen = json.loads((REPO / "figures" / "05_evaluate" / "results.json").read_text())["defaults"]["settings"]
    assert {k: chosen.get(k, REFINE_DEFAULTS[k]) for k in REFINE_DEFAULTS} == REFINE_DEFAULTS, (
        f"labkit.refine's defaults {REFINE_DEFAULTS} are not notebook 05's val winner {chosen}: update "
        "inference.REFINE_DEFAULTS"
    )
