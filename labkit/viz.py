"""Figures: image grids, curves, and save(fig, name) -> PNG + JSON of the numbers behind it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from .util import atomic_save, write_json


def as_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) / (1, H, W) tensor or (H, W[, C]) array -> (H, W, C) or (H, W) numpy in [0, 1]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        x = x[0] if x.ndim == 4 else x
        x = x.permute(1, 2, 0).numpy() if x.ndim == 3 else x.numpy()
    x = np.asarray(x)
    return np.clip(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x, 0, 1)


def grid(
    rows: Sequence[Sequence[Any]],
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    size: float = 1.9,
    boxes: dict | None = None,
):
    """A figure of images: rows × columns; boxes {(r, c): [(x0, y0, x1, y1, colour), ...]} drawn on top."""
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(size * nc, size * nr), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(nc):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(row) or row[c] is None:
                ax.axis("off")
                continue
            img = as_image(row[c])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            for x0, y0, x1, y1, col in (boxes or {}).get((r, c), []):
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=col, lw=1.2))
            if titles and r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=8)
            if row_labels and c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, name: str, out_dir: str | os.PathLike, data: Any = None) -> Path:
    """Save fig as out_dir/name.png (atomically) and, if given, the numbers behind it as name.json."""
    out = Path(out_dir)
    png = atomic_save(lambda p: fig.savefig(p, dpi=110, bbox_inches="tight", format="png"), out / f"{name}.png")
    if data is not None:
        write_json(data, out / f"{name}.json")
    return png


def interactive() -> bool:
    """True inside a live Jupyter kernel with a front end (not under papermill)."""
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("LABKIT_STATIC"):
        return False
    try:
        from IPython import get_ipython  # optional: imported where used

        ip = get_ipython()
        return ip is not None and "IPKernelApp" in ip.config and "papermill" not in str(type(ip))
    except Exception:
        return False


def short_block(name: str) -> str:
    """'transformer_blocks.3' -> 'd3', 'single_transformer_blocks.5' -> 's5' (tick labels; the full name elsewhere)."""
    kind, _, i = name.rpartition(".")
    return ("s" if kind.startswith("single") else "d") + i
