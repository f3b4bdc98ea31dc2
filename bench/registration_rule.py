"""Choose when a registration holds (align.register's MIN_INLIERS and MAX_RESIDUAL) on val, never on test.

A registration that holds is pasted (labkit.refine keeps the registered paste there, inference.accept_check); one
that does not leaves the draft. So a fit accepted too easily harms (a misregistered paste below the draft) and one
refused too easily forgoes the paste. For each candidate rule every val case of the four sets (drawn as notebook
05 draws its test: bench/accept_rule.cases) is registered afresh; the rule kept is the best mean region PSNR of
"paste where it holds, else the draft" with at most 5% of each set's cases more than 0.5 dB below the draft
(05's refine_never_harms bar); ties go to the stricter rule. The rows go to runs/registration_rule_rows.json.
~25 min on 2 cores (144 cases, 6 rules).

    .venv/bin/python bench/registration_rule.py [--n 12]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from accept_rule import cases  # noqa: E402

from labkit import align as A  # noqa: E402
from labkit.experiments.benchmark import HARM_DB, HARM_SHARE  # noqa: E402
from labkit.metrics import region_psnr  # noqa: E402
from labkit.util import write_json  # noqa: E402

RULES = [(3, 0.5), (4, 0.5), (3, 0.4), (4, 0.45), (4, 0.4), (5, 0.4)]  # (min_inliers, max_residual); (3, 0.5) earlier


def measure(c, min_inliers: int, max_residual: float) -> dict:
    """The draft's and (where the registration holds under this rule) the registered paste's region PSNR."""
    reg = A.register(c.draft, c.mask, c.reference, min_inliers=min_inliers, max_residual=max_residual)
    row = dict(kind=c.meta.get("failure") or c.meta["degradation"], ok=bool(reg.ok), scope=reg.scope)
    row |= dict(draft=region_psnr(c.draft, c.target, c.mask), inliers=reg.inliers, fit_error=float(reg.fit_error))
    row["kept"] = (
        region_psnr(A.registered_paste(c.draft, c.mask, c.reference, reg), c.target, c.mask) if reg.ok else row["draft"]
    )
    return row


def score(sets: dict[str, list[dict]]) -> tuple[float, float]:
    """(mean region PSNR over the sets' means, the largest share of any set's cases harmed)."""
    means = [np.mean([r["kept"] for r in rs]) for rs in sets.values()]
    harmed = [np.mean([r["kept"] < r["draft"] - HARM_DB for r in rs]) for rs in sets.values()]
    return float(np.mean(means)), float(max(harmed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=12, help="val cases per kind and set")
    a = ap.parse_args()
    val = cases("val", a.n)
    rows = {f"{i},{r}": {s: [measure(c, i, r) for c in cs] for s, cs in val.items()} for i, r in RULES}
    write_json(dict(n=a.n, rows=rows), "runs/registration_rule_rows.json")
    print(f"{'min_inliers':>11} {'max_residual':>12} {'mean':>6} {'worst set harmed':>16}  registered per set")
    scored = []
    for (i, r), key in zip(RULES, rows):
        mean, worst = score(rows[key])
        scored.append(((worst <= HARM_SHARE, round(mean, 3), i, -r), (i, r)))
        held = "  ".join(f"{s} {sum(x['ok'] for x in rs)}/{len(rs)}" for s, rs in rows[key].items())
        print(f"{i:11d} {r:12.2f} {mean:6.2f} {worst:16.1%}  {held}")
    i, r = max(scored)[1]
    print(f"chosen on val: MIN_INLIERS = {i}, MAX_RESIDUAL = {r} (align.py has {A.MIN_INLIERS}, {A.MAX_RESIDUAL})")


if __name__ == "__main__":
    main()
