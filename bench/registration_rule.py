"""The registration's acceptance rule side by side on the benchmark's *train* split (never the test set): the
earlier rule (8 RANSAC inliers, no coverage check) against align.register's defaults (3 inliers, the reference
covering half the draft outside the region, the same residual bound). Prints how many cases each registers and
the mean region PSNR of the registered paste and of labkit.refine's defaults under each (~1.5 min on 2 cores).

    python bench/registration_rule.py [--n-per-kind 20] [--split train]
"""

import argparse

import numpy as np

import labkit
from labkit import align as A
from labkit import evaluate as E
from labkit import inference as I
from labkit.metrics import region_psnr

RULES = {"earlier (8 inliers)": dict(min_inliers=8, min_coverage=0.0), "align.register defaults": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="train", choices=["train", "val"])
    ap.add_argument("--n-per-kind", type=int, default=20)
    a = ap.parse_args()
    bb = labkit.load("mini")
    cases = E.benchmark_cases(bb, split=a.split, seed=0, n_per_kind=a.n_per_kind, size=128, view_strength=0.4, room=0.5)
    real = A.register
    print(f"{len(cases)} {a.split} cases")
    for name, kw in RULES.items():
        I.register = lambda *x, _kw=kw, **k: real(*x, **{**k, **_kw})  # inference.registration calls it by name
        A.REGISTRATIONS.clear()
        ok = [A.REGISTRATIONS(c.draft, c.mask, c.reference, 0).ok for c in cases]
        paste = [
            region_psnr(I.refine_tensor(c.draft, c.mask, c.reference, method="paste_warp")[0], c.target, c.mask)
            for c in cases
        ]
        refine = [region_psnr(I.refine_tensor(c.draft, c.mask, c.reference)[0], c.target, c.mask) for c in cases]
        print(
            f"{name:26s} registered {sum(ok):3d}/{len(cases)}  registered paste {np.mean(paste):6.2f} dB  "
            f"labkit.refine {np.mean(refine):6.2f} dB"
        )
    I.register = real
    A.REGISTRATIONS.clear()


if __name__ == "__main__":
    main()
