"""Mini editor weights side by side on what decides whether a continued editor is kept: labkit.refine with its
defaults (the editor: no do-no-harm check) on notebook 05's val sets (planar and non-planar reference view; v3's
object-centric and appearance-shift sets) beside the registered paste, and the copy
test of notebook 00 (pretrain.evaluate_refine on val: the draft as it is, the target crop as the reference).
Each folder is measured in its own interpreter with LABKIT_MINI_WEIGHTS pointing at it (~2 min each on 2 cores).

    python bench/compare_editors.py labkit/weights/mini runs/editor_r5/weights
"""

import json
import os
import subprocess
import sys

import numpy as np

VAL = dict(
    split="val", seed=0, n_per_kind=4, kinds=["wrong", "lowres4", "smear"], size=128, view_strength=0.4, room=0.5
)


def measure(deform: float = 3.0, n_copy: int = 24) -> dict:
    """The numbers for the weights LABKIT_MINI_WEIGHTS names (mean region PSNR, dB)."""
    import labkit
    from labkit import evaluate as E
    from labkit import inference as I
    from labkit import metrics as Mt
    from labkit import presets as P
    from labkit import pretrain as PT

    bb = labkit.load("mini")
    out = {}
    sets = (
        ("planar", 0.0, "scene"),
        ("nonplanar", deform, "scene"),
        ("object", 0.0, "object"),
        ("shift", 0.0, "shift"),
    )
    for name, d, which in sets:  # benchmark v2's val sets and v3's (an object on its own, held-out appearance)
        cases = E.benchmark_cases(bb, ref_deform=d, which=which, **VAL)
        psnr = lambda x, c: Mt.region_psnr(x, c.target, c.mask)  # noqa: E731
        out[f"{name}: the editor (refine, no check)"] = np.mean(
            [psnr(I.refine_tensor(c.draft, c.mask, c.reference, accept=False)[0], c) for c in cases]
        )
        out[f"{name}: registered paste"] = np.mean(
            [psnr(I.refine_tensor(c.draft, c.mask, c.reference, method="paste_warp")[0], c) for c in cases]
        )
    r = PT.evaluate_refine(bb, n=n_copy, steps=8, split="val", cfg=PT.EditorConfig(region=P.editor_region("mini")))
    out |= {f"copy test: {k}": v for k, v in r["summary"].items() if k != "kinds_above_draft"}
    return {k: round(float(v), 3) for k, v in out.items()}


if __name__ == "__main__":
    if sys.argv[1:] == ["--one"]:
        print(json.dumps(measure()))
        sys.exit(0)
    folders = sys.argv[1:] or ["labkit/weights/mini"]
    cols = {}
    for f in folders:
        env = {**os.environ, "LABKIT_MINI_WEIGHTS": os.path.abspath(f)}
        run = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, check=True)
        cols[f] = json.loads(run.stdout.strip().splitlines()[-1])
    rows = list(next(iter(cols.values())))
    width = max(len(r) for r in rows)
    print(f"{'region PSNR (dB)':{width}s}  " + "  ".join(f"{f[-28:]:>28s}" for f in folders))
    for r in rows:
        print(f"{r:{width}s}  " + "  ".join(f"{cols[f][r]:28.3f}" for f in folders))
