"""Real images that Python packages ship, rendered text/logos, and (target, reference, draft) triplets.

Images are float32 numpy arrays (H, W, 3) in [0, 1] inside this module; `Triplet` exposes torch
tensors (3, H, W) in [0, 1]. Everything is deterministic from a seed. Splits are by *source image*.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from scipy import ndimage
from skimage import transform as sktf

from .images import bbox_of, resize, resize_np, to_tensor
from .util import atomic_save, case_seed, write_json

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "labkit"

# name -> (package, loader name, licence / provenance, split). Splits are by source image.
PHOTOS: dict[str, tuple[str, str, str, str]] = {
    "astronaut": ("skimage", "astronaut", "public domain (NASA)", "train"),
    "chelsea": ("skimage", "chelsea", "CC0 (Stefan van der Walt)", "train"),
    "rocket": ("skimage", "rocket", "public domain (SpaceX)", "train"),
    "immunohistochemistry": ("skimage", "immunohistochemistry", "public domain (Gemma Grieve)", "train"),
    "motorcycle": ("skimage", "stereo_motorcycle", "CC BY (Middlebury stereo, Scharstein et al.)", "train"),
    "hubble": ("skimage", "hubble_deep_field", "public domain (NASA/ESA)", "train"),
    "retina": ("skimage", "retina", "CC0 (Häggström)", "train"),
    "camera": ("skimage", "camera", "CC0 (skimage)", "train"),
    "brick": ("skimage", "brick", "CC0 (skimage)", "train"),
    "gravel": ("skimage", "gravel", "CC0 (skimage)", "train"),
    "clock": ("skimage", "clock", "CC0 (skimage)", "train"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg", "public domain (US Navy)", "val"),
    "coins": ("skimage", "coins", "public domain (Walters Art Museum)", "val"),
    "grass": ("skimage", "grass", "CC0 (skimage)", "val"),
    "coffee": ("skimage", "coffee", "CC0 (Rachel Michetti)", "test"),
    "china": ("sklearn", "china.jpg", "CC BY 2.0 (scikit-learn sample)", "test"),
    "flower": ("sklearn", "flower.jpg", "CC BY 2.0 (scikit-learn sample)", "test"),
    "page": ("skimage", "page", "CC0 (skimage)", "test"),
}
SPLITS = ("train", "val", "test")
N_RENDERED = {"train": 24, "val": 6, "test": 8}  # rendered text and logo sources per split
DEGRADATIONS = ("blur", "color", "elastic", "noise", "glyph", "vae")  # the benchmark's artifacts ("mixed" draws 2)
EDIT_DEGRADATIONS = (
    "smear",
    "occlude",
)  # strong ones for editor pretraining: they survive the VAE, so only the reference can undo them
# generative failures (the refine task and benchmark v2): wrong words/glyphs (content from elsewhere in the same
# image, or a fine warp of the glyphs), lost detail (x2/x4 low-res), smear, occlusion, colour, elastic
FAILURES = ("wrong", "glyph", "lowres2", "lowres4", "smear", "occlude", "color", "elastic")
BENCHMARK_KINDS = ("wrong", "lowres4", "smear")  # the benchmark's and the studio's examples: wrong glyphs, x4, smear

_WORDS = {  # disjoint vocabularies so rendered test text never appeared in training
    "train": "refine detail glyph latent token vector kernel signal focus region crop paste brand "
    "label model sample prior reward group policy studio atlas nimbus vortex quartz",
    "val": "harbor lantern meadow copper falcon willow ember",
    "test": "orbit saffron granite velvet tundra pixel mosaic cobalt",
}


# Training fonts come from the font-* packages on PyPI (installed by pyproject); matplotlib's bundled DejaVu
# fonts never reach training: they render the val and test splits, a held-out font set.
TRAIN_FONT_PACKAGES = (
    "font_lato",
    "font_source_sans_pro",
    "font_source_serif_pro",
    "font_caladea",
    "font_manrope",
    "font_hanken_grotesk",
    "font_fredoka_one",
    "font_fjallaone",
    "font_rhd",
    "font_amatic_sc",
    "font_intuitive",
)
BOLD_FONT = ("Bold", "Black", "Fredoka", "Fjalla")  # name parts of the heavy faces logos use


@cache
def _font_files(split: str = "val") -> tuple[str, ...]:
    """TTF/OTF files for a split: train from the font-* packages, val/test matplotlib's DejaVu (held out)."""
    if split != "train":
        import matplotlib  # heavy: imported where used

        return tuple(sorted(str(p) for p in (Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf")))

    files = []
    for pkg in TRAIN_FONT_PACKAGES:
        try:
            folder = importlib.resources.files(pkg) / "files"
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"the training fonts need the PyPI package {pkg.replace('_', '-')}: "
                "pip install -c constraints.txt -e . (or make venv) installs them"
            ) from None
        files += sorted(
            str(f) for f in folder.iterdir() if f.name.lower().endswith((".ttf", ".otf")) and "Variable" not in f.name
        )
    return tuple(files)


@cache
def load_photo(name: str) -> np.ndarray:
    """A photo shipped by an installed package, as (H, W, 3) float32 in [0, 1]."""
    package, key, _, _ = PHOTOS[name]
    if package == "skimage":
        import skimage.data  # optional: imported where used

        img = getattr(skimage.data, key)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
    elif package == "sklearn":
        from sklearn.datasets import load_sample_image  # optional: imported where used

        img = load_sample_image(key)
    else:
        import matplotlib.cbook

        img = np.asarray(Image.open(matplotlib.cbook.get_sample_data(key)).convert("RGB"))
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    return img / 255.0 if img.max() > 1.5 else img


@cache
def render_text(split: str, index: int, size: int = 384) -> np.ndarray:
    """A page of words in DejaVu fonts at mixed sizes and colours (deterministic per split/index)."""
    rng = np.random.default_rng([hash_str(split), index, 1])
    words = _WORDS[split].split()
    fonts = _font_files(split)
    bg = rng.uniform(0.75, 1.0, 3) if rng.random() < 0.7 else rng.uniform(0.0, 0.3, 3)
    img = Image.new("RGB", (size, size), tuple(int(255 * c) for c in bg))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(0, 12))
    while y < size:
        px = int(rng.choice([12, 16, 20, 28, 36, 48]))
        font = ImageFont.truetype(str(rng.choice(fonts)), px)
        fg = 1.0 - bg + rng.uniform(-0.2, 0.2, 3)
        line = " ".join(rng.choice(words, size=int(rng.integers(2, 6))))
        draw.text((int(rng.integers(-10, 20)), y), line, font=font, fill=tuple(int(255 * np.clip(c, 0, 1)) for c in fg))
        y += int(px * rng.uniform(1.1, 1.6))
    return np.asarray(img, dtype=np.float32) / 255.0


@cache
def render_logo(split: str, index: int, size: int = 384) -> np.ndarray:
    """A synthetic logo: flat shapes and bold letters over a gradient (deterministic per split/index)."""
    rng = np.random.default_rng([hash_str(split), index, 2])
    fonts = [f for f in _font_files(split) if any(b in Path(f).name for b in BOLD_FONT)]
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    img = Image.fromarray((255 * (c0 * (1 - ramp) + c1 * ramp)).repeat(size, 1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.integers(0, size - 40, 2)
        w, h = rng.integers(30, size // 2, 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=fill)
        else:
            pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
            draw.polygon(pts, fill=fill)
    letters = "".join(rng.choice(list("ABCDEFGHKLMNPRSTVXYZ"), size=int(rng.integers(1, 4))))
    font = ImageFont.truetype(str(rng.choice(fonts)), int(rng.integers(60, 130)))
    draw.text(
        (int(rng.integers(10, size // 3)), int(rng.integers(10, size // 2))),
        letters,
        font=font,
        fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
        stroke_width=int(rng.integers(0, 4)),
        stroke_fill=(255, 255, 255),
    )
    return np.asarray(img, dtype=np.float32) / 255.0


def hash_str(s: str) -> int:
    """A stable 32-bit hash of a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


def sources(split: str, content: str | None = None) -> list[tuple[str, str]]:
    """(content, name) of every source image in a split; content in {'photo', 'text', 'logo'}."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = [("photo", n) for n, v in PHOTOS.items() if v[3] == split]
    out += [("text", f"text{i}") for i in range(N_RENDERED[split])]
    out += [("logo", f"logo{i}") for i in range(N_RENDERED[split])]
    return [s for s in out if content is None or s[0] == content]


def load_source(split: str, content: str, name: str) -> np.ndarray:
    """Pixels of one source image (H, W, 3) in [0, 1]."""
    if content == "photo":
        return load_photo(name)
    index = int(name[4:])
    return render_text(split, index) if content == "text" else render_logo(split, index)


# ----------------------------------------------------------------------------------------------
# crops for backbone training
def random_crop(
    rng: np.random.Generator, img: np.ndarray, size: int, zoom: tuple[float, float] = (0.5, 1.0)
) -> np.ndarray:
    """A random square crop resized to `size` (zoom = crop side / short side range), random flip."""
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(*zoom))
    side = max(min(side, h, w), min(size, h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = resize_np(img[y : y + side, x : x + side], size)
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop


def crop_batch(
    rng: np.random.Generator,
    split: str,
    batch: int,
    size: int,
    text_frac: float = 0.3,
    zoom: tuple[float, float] = (0.3, 1.0),
) -> torch.Tensor:
    """(B, 3, size, size) random crops: photos, and rendered text/logos with probability text_frac."""
    photos, rendered = sources(split, "photo"), sources(split, "text") + sources(split, "logo")
    out = []
    for _ in range(batch):
        pool = rendered if rng.random() < text_frac else photos
        content, name = pool[rng.integers(len(pool))]
        out.append(random_crop(rng, load_source(split, content, name), size, zoom))
    return to_tensor(np.stack(out))


def heldout_crops(split: str, n: int, size: int, seed: int = 1234) -> tuple[torch.Tensor, list[str]]:
    """n fixed held-out crops (photos and rendered text/logos alternating) and their content labels."""
    rng = np.random.default_rng(seed)
    srcs = sources(split)
    photos = [s for s in srcs if s[0] == "photo"]
    rendered = [s for s in srcs if s[0] != "photo"]
    out, labels = [], []
    for i in range(n):
        pool = photos if i % 2 == 0 else rendered
        kind, name = pool[(i // 2) % len(pool)]
        out.append(random_crop(rng, load_source(split, kind, name), size, zoom=(0.4, 0.9)))
        labels.append(kind)
    return to_tensor(np.stack(out)), labels


# ----------------------------------------------------------------------------------------------
# triplets (RefGC-SR2's LRGI / HRRI / HRGT): target, reference, low-res draft, with the true correspondence
@dataclass
class Triplet:
    """A target, a reference of the same content in another view and light, and the low-res damaged image the
    draft is made from (RefGC-SR2's HRGT, HRRI and LRGI; notebook 02 uses the paper's names)."""

    target: torch.Tensor  # (3, S, S)  HRGT
    reference: torch.Tensor  # (3, S, S)  HRRI
    lowres: torch.Tensor  # (3, S/f, S/f)  LRGI: low-res, with the damage inside `mask`
    mask: torch.Tensor  # (1, S, S) object region in the target's (and the draft's) coordinates, {0, 1}
    ref_mask: torch.Tensor  # (1, S, S) the same region in the reference's coordinates (from the warp)
    scribble: torch.Tensor  # (1, S, S) a user-style stroke inside the mask
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of mask, x1/y1 exclusive
    ref_bbox: tuple[int, int, int, int]
    warp: np.ndarray  # (3, 3) homography, target pixel (x, y, 1) -> reference pixel
    meta: dict = field(default_factory=dict)  # source, content, degradation, factor, seed, split
    extra_refs: list = field(default_factory=list)  # more (3, S, S) views of the same content (multi-reference)

    @property
    def draft(self) -> torch.Tensor:
        """The low-res image bicubic-upsampled to the target's size (3, S, S): what every refiner starts from."""
        return resize(self.lowres, self.target.shape[-2:])


def random_blob(rng: np.random.Generator, size: int, area: tuple[float, float], margin: int = 4) -> np.ndarray:
    """A smooth blob (union of 1-3 ellipses) covering roughly `area` of a size×size image."""
    target = rng.uniform(*area) * size * size
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    m = np.zeros((size, size), bool)
    n = int(rng.integers(1, 4))
    r = np.sqrt(target / (np.pi * n))
    cx, cy = rng.uniform(margin + r, size - margin - r, 2) if size - 2 * (margin + r) > 0 else (size / 2, size / 2)
    for _ in range(n):
        a, b = r * rng.uniform(0.7, 1.4), r * rng.uniform(0.7, 1.4)
        th = rng.uniform(0, np.pi)
        ox, oy = (rng.uniform(-r, r, 2) * 0.6) if n > 1 else (0.0, 0.0)
        dx, dy = xx - cx - ox, yy - cy - oy
        u, v = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
        m |= (u / a) ** 2 + (v / b) ** 2 <= 1
    m[:margin], m[-margin:], m[:, :margin], m[:, -margin:] = False, False, False, False
    return m.astype(np.float32)


def _view_homography(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A random 'other view' A (reference pixel -> target pixel): rotation, scale, shift, perspective."""
    c = size / 2
    th = np.deg2rad(rng.uniform(-20, 20) * strength)
    s = np.exp(rng.uniform(-0.25, 0.25) * strength)
    t = rng.uniform(-0.15, 0.15, 2) * size * strength
    rot = np.array([[s * np.cos(th), -s * np.sin(th), 0], [s * np.sin(th), s * np.cos(th), 0], [0, 0, 1]])
    persp = np.eye(3)
    persp[2, :2] = rng.uniform(-0.4, 0.4, 2) * strength / size
    to_c, from_c = (
        np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1.0]]),
        np.array([[1, 0, c + t[0]], [0, 1, c + t[1]], [0, 0, 1.0]]),
    )
    return from_c @ persp @ rot @ to_c


def _warp(img: np.ndarray, inverse: np.ndarray, size: int, order: int = 3) -> np.ndarray:
    """Sample img at inverse(output pixel) with a homography (x, y) convention."""
    out = sktf.warp(
        img, sktf.ProjectiveTransform(matrix=inverse), output_shape=(size, size), order=order, mode="reflect"
    )
    return out.astype(np.float32)


def displace(rng: np.random.Generator, img: np.ndarray, scale: float, amp: float) -> np.ndarray:
    """img (H, W, 3) resampled through a smooth random displacement field: Gaussian noise smoothed at `scale`
    px, each axis scaled to a peak of amp * U(0.6, 1) px (a non-rigid change no homography undoes)."""
    h, w = img.shape[:2]
    d = [ndimage.gaussian_filter(rng.normal(size=(h, w)), scale) for _ in range(2)]
    d = [x / (np.abs(x).max() + 1e-8) * amp * rng.uniform(0.6, 1.0) for x in d]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    return np.stack(
        [ndimage.map_coordinates(img[..., k], [yy + d[0], xx + d[1]], order=1, mode="reflect") for k in range(3)], -1
    )


def degrade(rng: np.random.Generator, img: np.ndarray, kind: str, vae_roundtrip: Callable | None = None) -> np.ndarray:
    """One generative-style artifact applied to the whole image (masking is done by the caller)."""
    h = img.shape[0]
    if kind == "blur":
        return ndimage.gaussian_filter(img, sigma=(rng.uniform(1.0, 2.0),) * 2 + (0,))
    if kind == "color":
        gain = rng.uniform(0.7, 1.3, 3)
        return np.clip((img - 0.5) * rng.uniform(0.7, 1.1) + 0.5 + rng.uniform(-0.12, 0.12), 0, 1) * gain
    if kind in ("elastic", "glyph"):  # smooth displacement field; 'glyph' = finer and stronger
        return displace(rng, img, *((h / 6, 1.5) if kind == "elastic" else (h / 16, 1.2)))
    if kind == "noise":
        return img + rng.normal(0, rng.uniform(0.04, 0.1), img.shape).astype(np.float32)
    if (
        kind == "smear"
    ):  # detail gone, colour kept: the low frequencies stay with the image, the high must come from elsewhere
        return ndimage.gaussian_filter(img, sigma=(rng.uniform(3.0, 5.0),) * 2 + (0,))
    if kind == "occlude":  # content gone: a flat random colour
        return np.broadcast_to(rng.uniform(0.15, 0.85, 3).astype(np.float32), img.shape).copy()
    if kind == "vae":
        if vae_roundtrip is None:  # no VAE given: a coarse 4x down/up stands in, and says so in meta
            return resize_np(resize_np(img, h // 4, "bilinear"), h, "nearest")
        return vae_roundtrip(img)
    raise ValueError(f"unknown degradation {kind!r}; choose from {DEGRADATIONS + EDIT_DEGRADATIONS}")


def random_light(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """The reference's change of light: gamma, exposure, white balance (drawn in that order)."""
    return np.clip((img ** rng.uniform(0.8, 1.25)) * rng.uniform(0.85, 1.15) * rng.uniform(0.92, 1.08, 3), 0, 1)


def damage(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, kind: str) -> np.ndarray:
    """The draft: img (H, W, 3) with one generative failure inside mask (H, W); outside is untouched."""
    h, w = img.shape[:2]
    if kind == "wrong":  # plausible content from elsewhere in the same image: a wrong word/glyph in the same style
        bad = np.roll(img, (int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))), (0, 1))
    elif kind.startswith("lowres"):
        f = int(kind[6:])
        bad = resize_np(resize_np(img, (h // f, w // f)), (h, w))
    elif kind in FAILURES:
        bad = degrade(rng, img, kind)
    else:
        raise ValueError(f"unknown damage {kind!r}; choose from {FAILURES}")
    m = mask[..., None]
    return np.clip(m * bad + (1 - m) * img, 0, 1).astype(np.float32)


def make_triplet(
    seed: int,
    split: str = "train",
    size: int = 128,
    factor: int = 2,
    *,
    degradation: str = "mixed",
    area: tuple[float, float] = (0.04, 0.25),
    content: str | None = None,
    view_strength: float = 1.0,
    vae_roundtrip: Callable | None = None,
    extra_refs: int = 0,
    failure: str | None = None,
    ref_deform: float = 0.0,
    source: np.ndarray | None = None,
) -> Triplet:
    """One triplet (target, reference, low-res draft), deterministic from (seed, split, params); extra_refs
    further reference views come from their own RNG streams, so the triplet itself does not change with extra_refs.
    failure (one of FAILURES): the draft is the target itself at full size with that generative failure in
    the region (factor must be 1; the degradation arguments are not used). ref_deform: the reference's view is
    also non-planar: a smooth displacement of up to that many px (scale size/6; its own RNG stream, so the rest
    of the triplet is the same with and without it; ref_mask/ref_bbox ignore it). source (H, W, 3): this image
    instead of the split's source drawn (the draw still happens, so the rest of the triplet's randomness is kept)."""
    if failure is not None and (factor != 1 or failure not in FAILURES):
        raise ValueError(f"failure={failure!r} needs factor=1 and one of {FAILURES}")
    if size % factor:
        raise ValueError(f"size {size} must be divisible by the downscale factor {factor}")
    if not ref_deform >= 0:
        raise ValueError(f"ref_deform is a displacement in px and must be >= 0 (0 = a planar view); got {ref_deform}")
    rng = np.random.default_rng([seed, hash_str(split), size, factor])
    srcs = sources(split, content)
    kind, name = srcs[int(rng.integers(len(srcs)))]
    img = load_source(split, kind, name) if source is None else source
    h, w = img.shape[:2]
    for _ in range(20):  # resample until the region stays in view of the reference
        side = rng.uniform(0.35, 0.8) * min(h, w)
        ox, oy = rng.uniform(0, w - side), rng.uniform(0, h - side)
        t_gt = np.array([[side / size, 0, ox], [0, side / size, oy], [0, 0, 1.0]])  # target px -> source px
        a = _view_homography(rng, size, view_strength)  # reference px -> target px
        mask = random_blob(rng, size, area)
        ref_mask = (_warp(mask, a, size, order=1) > 0.5).astype(np.float32)
        if ref_mask.sum() >= 0.9 * mask.sum() * abs(np.linalg.det(np.linalg.inv(a)[:2, :2])):
            break
    target = np.clip(_warp(img, t_gt, size), 0, 1)
    reference = np.clip(_warp(img, t_gt @ a, size), 0, 1)
    if ref_deform > 0:  # parallax / a non-rigid change: what a registered (planar) paste cannot undo
        reference = displace(
            np.random.default_rng([seed, hash_str(split), size, factor, 4201]), reference, size / 6, ref_deform
        )
    # photometric change of the reference: gamma, exposure, white balance
    reference = random_light(rng, reference)
    if failure is not None:
        kinds, lowres = [failure], damage(rng, target, mask, failure)
    else:
        kinds = (
            list(rng.choice([d for d in DEGRADATIONS if d != "vae" or vae_roundtrip], 2, replace=False))
            if degradation == "mixed"
            else [degradation]
        )
        low = resize_np(target, size // factor)
        m_low = resize_np(mask[..., None], size // factor, "bilinear")
        bad = low
        for k in kinds:
            bad = degrade(rng, bad, k, vae_roundtrip)
        lowres = np.clip(m_low * bad + (1 - m_low) * low, 0, 1)
    scribble = _scribble(rng, mask)
    meta = dict(
        source=name,
        content=kind,
        degradation="+".join(kinds),
        factor=factor,
        seed=seed,
        split=split,
        size=size,
        vae_stand_in="vae" in kinds and vae_roundtrip is None,
        **({"ref_deform": ref_deform} if ref_deform else {}),
    )
    t = lambda x: to_tensor(x if x.ndim == 3 else x[..., None])  # noqa: E731
    extra = []
    for k in range(extra_refs):  # other views of the same crop: own homography and photometric change
        rk = np.random.default_rng([seed, hash_str(split), size, factor, 7919, k])
        v = np.clip(_warp(img, t_gt @ _view_homography(rk, size, view_strength), size), 0, 1)
        extra.append(t(random_light(rk, v)))
    return Triplet(
        target=t(target),
        reference=t(reference),
        lowres=t(lowres),
        mask=t(mask),
        ref_mask=t(ref_mask),
        scribble=t(scribble),
        bbox=bbox_of(mask),
        ref_bbox=bbox_of(ref_mask),
        warp=np.linalg.inv(a),
        meta=meta,
        extra_refs=extra,
    )


def _scribble(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A 2-px polyline through random points of the mask (what a user would draw)."""
    ys, xs = np.nonzero(mask > 0.5)
    idx = rng.integers(0, len(xs), 4)
    img = Image.new("L", mask.shape[::-1], 0)
    ImageDraw.Draw(img).line([(int(xs[i]), int(ys[i])) for i in idx], fill=255, width=2)
    return (np.asarray(img, np.float32) / 255.0) * (mask > 0.5)


def eval_set(
    n: int = 64,
    degradations: Sequence[str] = ("blur", "color", "elastic", "glyph"),
    size: int = 128,
    factor: int = 2,
    split: str = "test",
    seed: int = 0,
    cache: bool = True,
    extra_refs: int = 0,
) -> list[Triplet]:
    """The fixed evaluation set: n cases × each degradation, built on demand and cached on disk
    (extra_refs > 0: the same cases with more reference views, for multi-reference studies)."""
    key = dict(n=n, d=list(degradations), size=size, factor=factor, split=split, seed=seed, v=3)
    key = json.dumps(key | (dict(extra_refs=extra_refs) if extra_refs else {}))
    path = CACHE_DIR / f"eval_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if cache and (path / "cases.json").exists():
        return load_triplets(path)
    cases = [
        make_triplet(case_seed(seed, i), split, size, factor, degradation=d, extra_refs=extra_refs)
        for i in range(n)
        for d in degradations
    ]
    if cache:
        save_triplets(cases, path)
    return cases


TENSORS = ("target", "reference", "lowres", "mask", "ref_mask", "scribble")


def save_triplets(cases: Sequence[Triplet], folder: Path) -> Path:
    """Triplets as one safetensors file (pixels) + cases.json (boxes, warp, meta): no pickles. Atomic."""
    tensors = {f"{i}.{k}": getattr(c, k).contiguous() for i, c in enumerate(cases) for k in TENSORS}
    tensors |= {f"{i}.extra.{j}": r.contiguous() for i, c in enumerate(cases) for j, r in enumerate(c.extra_refs)}
    meta = [
        dict(bbox=c.bbox, ref_bbox=c.ref_bbox, warp=c.warp.tolist(), meta=c.meta, n_extra=len(c.extra_refs))
        for c in cases
    ]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda p: save_file(tensors, p), folder / "pixels.safetensors")
    write_json(meta, folder / "cases.json")  # written last: its presence marks a complete cache
    return folder


def load_triplets(folder: Path) -> list[Triplet]:
    """The inverse of save_triplets."""
    px = load_file(str(folder / "pixels.safetensors"))
    out = []
    for i, m in enumerate(json.loads((folder / "cases.json").read_text())):
        out.append(
            Triplet(
                **{k: px[f"{i}.{k}"] for k in TENSORS},
                bbox=tuple(m["bbox"]),
                ref_bbox=tuple(m["ref_bbox"]),
                warp=np.array(m["warp"]),
                meta=m["meta"],
                extra_refs=[px[f"{i}.extra.{j}"] for j in range(m["n_extra"])],
            )
        )
    return out
