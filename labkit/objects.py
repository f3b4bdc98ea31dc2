"""Cases unlike labkit's own: an object photographed on its own, and appearance families held out of training.

Two benchmark-v3 sets of notebook 05 (issue: refine must do no harm on images it never generated):

* **object-centric** (Refine-by-Align's references, RefGC-SR2's HRRI): the reference is a *product shot* - the
  object alone, frontal, on a plain or studio backdrop, larger and slightly rotated, in its own light; the draft
  is a scene in which the object sits at another scale, in perspective and in another light, on a plane or bent
  around a cylinder. No background is shared: only the object's own unmasked parts can register it.
* **appearance-shift**: the planar setting of benchmark v2 (the same scene in another view) drawn in style
  families that never reach train or val (STYLES: fonts, colour schemes, background sources, text sizes).

Every case is a data.Triplet (factor 1: the draft is the target with one generative failure in the region);
meta holds the true reference -> draft mapping's parameters (true_reference_coords evaluates it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from . import data as D
from . import images as IM

# appearance families: "seen" reaches train and val, "held_out" only test (names the notebook prints)
STYLES = {
    "fonts": dict(seen="font-* packages (Lato, Source Sans/Serif, Manrope ...)", held_out="Computer Modern, STIX"),
    "colours": dict(seen="dark text on light, muted panels", held_out="light-on-dark, saturated panels"),
    "backgrounds": dict(seen="train/val photos", held_out="test photos, stripes and checkers"),
    "text_sizes": dict(seen="14-28 px", held_out="9-12 px and 40-56 px"),
    "objects": dict(seen="labels, logos, photo patches", held_out="labels, logos, photo patches (test sources)"),
}
HELD_OUT_FONTS = ("cmr10", "cmb10", "cmss10", "cmtt10", "cmti10", "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic")
OBJECT_KINDS = ("label", "logo", "photo")


def family_of(split: str) -> str:
    """Which appearance families a split draws from: test the held-out ones, train and val the seen ones."""
    if split not in D.SPLITS:
        raise ValueError(f"split must be one of {D.SPLITS}, got {split!r}")
    return "held_out" if split == "test" else "seen"


def _fonts(split: str) -> list[str]:
    """Font files of a split's family: the held-out faces (matplotlib's cm* and STIX) for test, else train's."""
    if family_of(split) == "seen":
        return list(D._font_files("train"))
    import matplotlib  # heavy: imported where used

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [str(folder / f"{n}.ttf") for n in HELD_OUT_FONTS if (folder / f"{n}.ttf").exists()]


def _colours(rng: np.random.Generator, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(panel, ink) RGB of a split's colour family."""
    if family_of(split) == "seen":  # dark ink on a light, muted panel
        panel = rng.uniform(0.7, 0.95) + rng.uniform(-0.05, 0.05, 3)
        return np.clip(panel, 0, 1), rng.uniform(0.0, 0.25, 3)
    if rng.random() < 0.5:  # light on dark
        return rng.uniform(0.0, 0.2, 3), rng.uniform(0.8, 1.0, 3)
    hue = np.eye(3)[rng.permutation(3)]  # a saturated panel, ink of the opposite brightness
    panel = np.clip(hue[0] * rng.uniform(0.8, 1.0) + hue[1] * rng.uniform(0, 0.5), 0, 1)
    return panel, (1.0 - panel) * rng.uniform(0.7, 1.0)


def _text_px(rng: np.random.Generator, split: str) -> int:
    """A text size of the split's family."""
    if family_of(split) == "seen":
        return int(rng.integers(14, 29))
    return int(rng.integers(9, 13)) if rng.random() < 0.5 else int(rng.integers(40, 57))


def render_label(rng: np.random.Generator, split: str, hw: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A printed label (h, w, 3): a panel in the split's colours with words in its fonts and sizes, a border."""
    h, w = hw
    panel, ink = _colours(rng, split)
    img = Image.new("RGB", (w, h), tuple(int(255 * c) for c in panel))
    draw = ImageDraw.Draw(img)
    fonts, words = _fonts(split), D._WORDS[split].split()
    y = int(rng.integers(2, 10))
    while y < h - 8:
        px = min(_text_px(rng, split), h - 4)
        font = ImageFont.truetype(str(rng.choice(fonts)), px)
        draw.text(
            (int(rng.integers(2, 14)), y),
            " ".join(rng.choice(words, 2)),
            font=font,
            fill=tuple(int(255 * c) for c in ink),
        )
        y += int(px * rng.uniform(1.05, 1.4))
    draw.rectangle([1, 1, w - 2, h - 2], outline=tuple(int(255 * c) for c in ink), width=2)
    return np.asarray(img, np.float32) / 255.0


def object_image(rng: np.random.Generator, split: str, kind: str, hw: tuple[int, int] = (96, 128)) -> np.ndarray:
    """The object's own pixels (h, w, 3): a label, a crop of a logo, or a patch of a photo of the split."""
    if kind == "label":
        return render_label(rng, split, hw)
    srcs = D.sources(split, kind)
    c, name = srcs[int(rng.integers(len(srcs)))]
    src = D.load_source(split, c, name)
    s = rng.uniform(0.4, 0.8) * min(src.shape[:2])
    oy, ox = rng.uniform(0, src.shape[0] - s * hw[0] / hw[1]), rng.uniform(0, src.shape[1] - s)
    crop = src[int(oy) : int(oy + s * hw[0] / hw[1]), int(ox) : int(ox + s)]
    return IM.resize_np(crop, hw)


def background(rng: np.random.Generator, split: str, size: int) -> np.ndarray:
    """A scene background (size, size, 3) from the split's family: its photos, or (test) stripes and checkers."""
    if family_of(split) == "held_out" and rng.random() < 0.4:
        yy, xx = np.mgrid[:size, :size] / size
        a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        f = rng.uniform(3, 9)
        pat = (
            (np.sin(2 * np.pi * f * (xx + yy * rng.uniform(-1, 1))) > 0)
            if rng.random() < 0.5
            else ((np.floor(xx * f) + np.floor(yy * f)) % 2 > 0)
        )
        return np.where(pat[..., None], a, b).astype(np.float32)
    srcs = D.sources(split, "photo")
    _, name = srcs[int(rng.integers(len(srcs)))]
    return D.random_crop(rng, D.load_photo(name), size, zoom=(0.5, 1.0))


def backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A product shot's backdrop (size, size, 3): a plain colour, or a studio sweep (a vertical ramp, a vignette)."""
    c = rng.uniform(0.55, 0.95) + rng.uniform(-0.05, 0.05, 3)
    if rng.random() < 0.5:
        return np.broadcast_to(np.clip(c, 0, 1), (size, size, 3)).astype(np.float32).copy()
    yy, xx = (np.mgrid[:size, :size] / size - 0.5).astype(np.float32)
    ramp = 1.0 - 0.35 * (yy + 0.5) - 0.4 * (xx**2 + yy**2)
    return np.clip(c * ramp[..., None], 0, 1).astype(np.float32)


def _similarity(scale: float, deg: float, center: tuple[float, float], obj_hw: tuple[int, int]) -> np.ndarray:
    """(3, 3) object px -> image px: the object's centre to `center`, scaled and rotated."""
    th = np.deg2rad(deg)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1.0]])
    to_c = np.array([[1, 0, -obj_hw[1] / 2], [0, 1, -obj_hw[0] / 2], [0, 0, 1.0]])
    return np.array([[1, 0, center[0]], [0, 1, center[1]], [0, 0, 1.0]]) @ rot @ np.diag([scale, scale, 1]) @ to_c


def _bend(u: np.ndarray, width: float, k: float) -> np.ndarray:
    """Cylinder bend of object x (px), seen from the front: x' = c + R·sin((x - c)/R), R = width / (2k); k = 0 flat."""
    if k == 0:
        return u
    c, r = width / 2, width / (2 * k)
    return c + r * np.sin((u - c) / r)


def _unbend(u: np.ndarray, width: float, k: float) -> np.ndarray:
    """The inverse of _bend (x' -> x), NaN outside the cylinder's visible half."""
    if k == 0:
        return u
    c, r = width / 2, width / (2 * k)
    s = (u - c) / r
    return np.where(np.abs(s) <= 1, c + r * np.arcsin(np.clip(s, -1, 1)), np.nan)


def _render(obj: np.ndarray, to_img: np.ndarray, size: int, k: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The object drawn into a size² image through homography to_img (object px -> image px) after a cylinder bend
    of strength k, with the bend's shading: (pixels (size, size, 3), alpha (size, size))."""
    h, w = obj.shape[:2]
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    p = np.stack([xx.ravel(), yy.ravel(), np.ones(size * size)])  # image px
    q = np.linalg.inv(to_img) @ p
    bx, by = q[0] / q[2], q[1] / q[2]  # bent object px
    ox = _unbend(bx, w, k)
    ok = np.isfinite(ox)
    ox = np.where(ok, ox, -10)
    rgb = np.stack([ndimage.map_coordinates(obj[..., c], [by, ox], order=1, mode="nearest") for c in range(3)], -1)
    alpha = ndimage.map_coordinates(np.pad(np.ones((h, w), np.float32), 1), [by + 1, ox + 1], order=1, mode="constant")
    alpha = alpha * ok
    if k:  # a cylinder is lit from the front: darker towards its silhouette
        shade = np.cos(np.clip((ox - w / 2) / (w / (2 * k)), -1.5, 1.5)) ** 0.5
        rgb = rgb * shade[:, None]
    return rgb.reshape(size, size, 3).astype(np.float32), alpha.reshape(size, size).astype(np.float32)


def object_case(seed: int, split: str = "test", size: int = 128, failure: str = "wrong", *, curved: bool = False,
                kind: str | None = None) -> D.Triplet:  # fmt: skip
    """One object-centric case: the product shot as reference, the object in a scene (curved: bent around a
    cylinder) with `failure` in a region on the object. meta: the object's homographies and bend (ground truth)."""
    if failure not in D.FAILURES:
        raise ValueError(f"failure must be one of {D.FAILURES}, got {failure!r}")
    rng = np.random.default_rng([seed, D.hash_str(split), D.hash_str("object"), size, int(curved)])
    kind = kind or str(rng.choice(OBJECT_KINDS))
    obj_hw = (96, 128)
    obj = object_image(rng, split, kind, obj_hw)
    k = float(rng.uniform(0.6, 0.9)) if curved else 0.0
    # the scene: the object at another scale, rotated, in perspective, in another light
    persp = np.eye(3)
    persp[2, :2] = rng.uniform(-0.003, 0.003, 2)  # per px of the object from its centre
    c = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    to_scene = _similarity(rng.uniform(0.55, 0.75) * size / obj_hw[1], rng.uniform(-15, 15), tuple(c), obj_hw)
    centre = np.array([[1, 0, -obj_hw[1] / 2], [0, 1, -obj_hw[0] / 2], [0, 0, 1.0]])
    to_scene = to_scene @ np.linalg.inv(centre) @ persp @ centre  # perspective about the object's centre
    fg, alpha = _render(obj, to_scene, size, k)
    target = D.random_light(rng, alpha[..., None] * fg + (1 - alpha[..., None]) * background(rng, split, size))
    # the product shot: frontal, larger, slightly rotated, on a backdrop, in its own light
    to_ref = _similarity(rng.uniform(0.85, 0.95) * size / obj_hw[1], rng.uniform(-8, 8), (size / 2, size / 2), obj_hw)
    rfg, ralpha = _render(obj, to_ref, size)
    reference = D.random_light(rng, ralpha[..., None] * rfg + (1 - ralpha[..., None]) * backdrop(rng, size))
    # the region: a blob on the object, leaving most of the object visible around it
    core = ndimage.binary_erosion(
        alpha > 0.99, iterations=size * 3 // 32
    )  # the ring around the region stays on the object (12 px at 128)
    for _ in range(50):
        mask = D.random_blob(rng, size, (0.02, 0.08)) * core
        if mask.sum() > 0.015 * size * size:
            break
    else:
        raise RuntimeError(f"object case {seed}: no region fits on the object")
    draft = D.damage(rng, target.astype(np.float32), mask, failure)
    t = lambda x: IM.to_tensor(np.ascontiguousarray(x if x.ndim == 3 else x[..., None], dtype=np.float32))  # noqa: E731
    meta = dict(set="object", kind=kind, curved=curved, bend=k, failure=failure, seed=seed, split=split, size=size)
    meta |= dict(
        to_scene=to_scene.tolist(), to_ref=to_ref.tolist(), obj_hw=list(obj_hw), content=kind, degradation=failure
    )
    return D.Triplet(
        target=t(target), reference=t(reference), lowres=t(draft), mask=t(mask), ref_mask=t((ralpha > 0.5) * 1.0),
        scribble=t(mask), bbox=IM.bbox_of(mask), ref_bbox=IM.bbox_of(ralpha > 0.5),
        warp=to_ref @ np.linalg.inv(to_scene), meta=meta,
    )  # fmt: skip


def true_reference_coords(case: D.Triplet) -> np.ndarray:
    """(H, W, 2) where each draft pixel's content lies in the reference, (x, y) in pixels (NaN off the object)."""
    m = case.meta
    size, w = m["size"], m["obj_hw"][1]
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    q = np.linalg.inv(np.asarray(m["to_scene"])) @ np.stack([xx.ravel(), yy.ravel(), np.ones(size * size)])
    ox = _unbend(q[0] / q[2], w, m["bend"])
    r = np.asarray(m["to_ref"]) @ np.stack([ox, q[1] / q[2], np.ones(size * size)])
    return np.stack([r[0] / r[2], r[1] / r[2]], -1).reshape(size, size, 2)


def shift_image(rng: np.random.Generator, split: str, size: int = 384) -> np.ndarray:
    """A source image of the appearance-shift set: labels of the split's family laid on its background."""
    img = IM.resize_np(background(rng, split, 96), size)
    for _ in range(int(rng.integers(2, 4))):
        hw = (int(rng.integers(90, 160)), int(rng.integers(140, 260)))
        lab = render_label(rng, split, hw)
        y, x = int(rng.integers(0, size - hw[0])), int(rng.integers(0, size - hw[1]))
        img[y : y + hw[0], x : x + hw[1]] = lab
    return img


def shift_case(seed: int, split: str = "test", size: int = 128, failure: str = "wrong", *,
               view_strength: float = 0.4) -> D.Triplet:  # fmt: skip
    """One appearance-shift case: benchmark v2's planar setting (make_triplet) on a source drawn in the split's
    style family (shift_image)."""
    rng = np.random.default_rng([seed, D.hash_str(split), D.hash_str("shift")])
    t = D.make_triplet(seed, split, size, 1, failure=failure, view_strength=view_strength,
                       source=shift_image(rng, split))  # fmt: skip
    t.meta |= dict(set="shift", family=family_of(split), failure=failure)
    return t
