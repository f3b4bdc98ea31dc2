"""Real images that Python packages ship, rendered text/logos, and (target, reference, draft) triplets.

Images are float32 numpy arrays (H, W, 3) in [0, 1] inside this module; `Triplet` exposes torch
tensors (3, H, W) in [0, 1]. Everything is deterministic from a seed. Splits are by *source image*.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors.torch import load_file, save_file
from scipy import ndimage
from skimage import transform as sktf

from . import presets as P
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


def resize(img: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic", clamp: bool = True) -> torch.Tensor:
    """THE resize: (..., C, H, W) tensor to size (square int or (h, w)), anti-aliased when shrinking,
    clamped to [0, 1] (clamp=False for signed fields such as differences); mode bicubic | bilinear | nearest | area."""
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = img.reshape(-1, *img.shape[-3:]).float()
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    kw = dict(align_corners=False, antialias=shrink) if mode in ("bicubic", "bilinear") else {}
    out = F.interpolate(x, size=hw, mode=mode, **kw)
    return (out.clamp(0, 1) if clamp else out).reshape(*img.shape[:-2], *hw)


MASK_RULES = ("threshold", "coverage", "touched")


def resize_mask(mask: torch.Tensor, hw: tuple[int, int], rule: str = "threshold") -> torch.Tensor:
    """THE mask resize, (..., 1, H, W) to hw by one of three rules: 'threshold' ({0, 1}: bilinear then > 0.5; a pixel
    mask at a new image size), 'coverage' (the fraction of each new cell the mask covers; loss weights on the
    latent grid), 'touched' ({0, 1}: 1 where the mask touches the cell; the latent cells a blend must generate)."""
    hw = (int(hw[0]), int(hw[1]))
    if rule == "threshold":
        return (resize(mask.float(), hw, "bilinear") > 0.5).float()
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; choose from {MASK_RULES}")
    if tuple(mask.shape[-2:]) == hw:
        return mask.float()
    x = mask.float().reshape(-1, *mask.shape[-3:])
    out = F.adaptive_avg_pool2d(x, hw) if rule == "coverage" else F.adaptive_max_pool2d(x, hw)
    return out.reshape(*mask.shape[:-2], *hw)


def resize_np(img: np.ndarray, size: int | tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """resize() for an (H, W, C) numpy image (this module's pixel format)."""
    return to_numpy(resize(to_tensor(img), size, mode))


def bicubic_draft(images: torch.Tensor, factor: int) -> torch.Tensor:
    """THE low-res draft: bicubic down by `factor` (anti-aliased) and back up to the same size (the
    no-model baseline at equal scale, the upscale task's context, Triplet.draft's recipe)."""
    h, w = images.shape[-2:]
    return resize(resize(images, (h // factor, w // factor)), (h, w))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(..., H, W, C) numpy -> (..., C, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, -3))).float()


def to_numpy(img: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) tensor -> (..., H, W, C) float32 numpy."""
    return np.moveaxis(img.detach().float().cpu().numpy(), -3, -1)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL RGB (rounded to uint8)."""
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# THE input check: images and masks as users hand them in (PIL, tensors, arrays)
def _array(x, name: str, what: str = "a (3, H, W) tensor or an (H, W, 3) array") -> np.ndarray | torch.Tensor:
    if isinstance(x, Image.Image):
        return np.asarray(x)
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x
    raise TypeError(
        f"{name} must be a PIL.Image, {what}; got {type(x).__name__}"
        + (" (wrap a list of lists in np.array(...))" if isinstance(x, (list, tuple)) else "")
    )


WIDE_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit and float single-channel images


def _pil_pixels(x: Image.Image) -> np.ndarray:
    """A PIL image's pixels by their own range: 16-bit (I;16, and I as 16-bit PNGs open) / 65535, 8-bit as is.

    PIL's own .convert('RGB') clips 16-bit values at 255 (a 16-bit PNG turns white), so wide modes are read here."""
    if x.mode in WIDE_PIL_MODES:
        a = np.asarray(x)
        if x.mode != "F":
            hi = int(a.max()) if a.size else 0
            if hi > 65535 or int(a.min()) < 0:
                raise ValueError(
                    f"a {x.mode} image with values in [{int(a.min())}, {hi}]: expected 16-bit 0..65535; "
                    "save it as 8- or 16-bit PNG"
                )
            a = a.astype(np.float32) / 65535.0
        return np.repeat(a.astype(np.float32)[..., None], 3, axis=2)
    return np.asarray(x.convert("RGB"))


def as_image_tensor(x, name: str = "image", min_side: int = 1) -> torch.Tensor:
    """PIL / (3, H, W) or (1, 3, H, W) tensor / (H, W, 3) array -> (3, H, W) float tensor in [0, 1].

    uint8 data is read as 0..255 and uint16 data (16-bit PNGs, PIL mode I;16) as 0..65535; other integer data
    must hold 0..255; float data must already be in [0, 1] and finite; each side at least `min_side` pixels (the
    model methods need one packing unit: VAE x8 and 2x2 packing) - anything else is refused with what was given
    and how to fix it."""
    if isinstance(x, Image.Image):
        x = _pil_pixels(x)
    a = _array(x, name)
    given = tuple(a.shape)
    wide = (isinstance(a, np.ndarray) and a.dtype == np.uint16) or (torch.is_tensor(a) and a.dtype == torch.uint16)
    n = a.numel() if torch.is_tensor(a) else a.size
    top = (int(a.to(torch.int32).max()) if torch.is_tensor(a) else int(a.max())) if wide and n else 0
    if 0 < top <= 255:
        raise ValueError(
            f"{name} is uint16 with values up to {top}: 8-bit pixels in a 16-bit array (read as 0..65535 "
            "they would be nearly black); cast it to uint8 (x.astype(np.uint8)) or scale it to 0..65535"
        )
    if isinstance(a, np.ndarray) and a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()
    if t.dtype == torch.uint16:
        t = t.to(torch.float32) / 65535.0
    if isinstance(a, np.ndarray) and t.ndim == 4 and t.shape[0] == 1 and t.shape[-1] == 3:
        t = t[0]  # a (1, H, W, 3) batch of one array
    if isinstance(a, np.ndarray) and t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)  # (H, W, 3) arrays
    t = t[0] if t.ndim == 4 and t.shape[0] == 1 else t
    if t.ndim != 3 or t.shape[0] != 3:
        hint = "convert grey or RGBA images with PIL's .convert('RGB')"
        if torch.is_tensor(a) and len(given) in (3, 4) and given[-1] == 3:
            hint = "a tensor is channels-first: pass x.permute(2, 0, 1) (or x[0].permute(2, 0, 1) for a batch of one)"
        raise ValueError(
            f"{name} must be RGB: a (3, H, W) or (1, 3, H, W) tensor, an (H, W, 3) array or a PIL image; got a "
            f"{type(a).__name__} of shape {given} ({hint})"
        )
    h, w = t.shape[-2:]
    if h < min_side or w < min_side:
        raise ValueError(
            f"{name} is {h}x{w} pixels; the model methods need at least {min_side}x{min_side} (one VAE x8 latent "
            f"2x2 patch): upsample it first, e.g. PIL .resize(({max(w, min_side)}, {max(h, min_side)}))"
        )
    if t.dtype == torch.bool or not (
        t.is_floating_point() or t.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)
    ):
        raise TypeError(f"{name} has dtype {t.dtype}: pass uint8 (0..255), uint16 (0..65535) or float (0..1) pixels")
    if not t.is_floating_point():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{name} is {t.dtype} with values in [{lo}, {hi}]; expected 0..255 (uint8), or pass uint16 "
                "data as uint16 (read as 0..65535)"
            )
        return t.float() / 255.0
    t = t.float()
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise ValueError(
            f"{name} holds {bad} NaN/inf values: pass finite pixels (e.g. torch.nan_to_num(x).clamp(0, 1))"
        )
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        hint = "divide by 255" if hi <= 255 and lo >= 0 else "rescale it to [0, 1] (e.g. (x + 1) / 2 for [-1, 1] data)"
        raise ValueError(f"{name} is float with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]: {hint}")
    return t.clamp(0, 1)


def _mask_plane(m) -> tuple[np.ndarray | torch.Tensor, str]:
    """The one plane a mask is read from, and how: the alpha channel when there is one that varies, else the
    brightest channel (so any non-black pixel - red, white, grey - counts, whatever its colour)."""
    if isinstance(m, Image.Image):
        if m.mode in WIDE_PIL_MODES:
            return np.asarray(m).astype(np.float32) / (1.0 if m.mode == "F" else 65535.0), f"PIL {m.mode} image"
        if m.mode == "P":
            m = m.convert("RGBA")
        bands = m.getbands()
        if "A" in bands:
            alpha = np.asarray(m.getchannel("A"))
            if alpha.min() != alpha.max():
                return alpha, f"the alpha channel of a PIL {m.mode} image"
        rgb = np.asarray(m.convert("RGB"))
        return rgb.max(axis=2), f"the brightest channel of a PIL {m.mode} image"
    a = _array(m, "mask", "an (H, W) or (1, H, W) tensor/array")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3, 4):  # (H, W, 3|4) arrays
        if a.shape[-1] == 4 and a[..., 3].min() != a[..., 3].max():
            return a[..., 3], "the alpha channel of an (H, W, 4) array"
        return a[..., :3].max(-1) if isinstance(a, np.ndarray) else a[..., :3].amax(
            -1
        ), "the brightest channel of an (H, W, 3) array"
    return a, f"a {type(a).__name__} of shape {tuple(a.shape)}"


def as_mask_tensor(m, hw: tuple[int, int]) -> torch.Tensor:
    """PIL / tensor / array mask -> (1, H, W) in {0, 1}: any non-black pixel (0/1 or 0..255 integers: > 0 or
    > 31 on the brightest channel; float: > 0.5), or the alpha channel when it varies; checks the size against
    the image and that the mask is not empty (the error says what was read)."""
    a, how = _mask_plane(m)
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a.detach().cpu()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (1, H, W) (or an RGB/RGBA image); got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(hw):
        raise ValueError(
            f"mask size {tuple(t.shape)} does not match the image {tuple(hw)}: resize the mask to the image (nearest)"
        )
    if t.dtype == torch.bool:
        inside, rule = t, "True"
    elif not t.is_floating_point():  # 0/1 or 0..255 integer masks (a PIL 'L' mask may hold either)
        cut = 0 if int(t.max()) <= 1 else 31
        inside, rule = t > cut, f"> {cut}"
    else:
        if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1 + 1e-6:
            raise ValueError(
                f"float mask values must be finite and in [0, 1]; got [{float(t.min()):.3g}, {float(t.max()):.3g}] "
                "(pass a uint8 0/255 mask, or divide by 255)"
            )
        inside, rule = t > 0.5, "> 0.5"
    if not inside.any():
        raise ValueError(
            f"empty mask: read {how}, values in [{float(t.min()):.3g}, {float(t.max()):.3g}], none {rule}; "
            "mark the region to refine with any non-black pixel (or an alpha channel)"
        )
    return inside.float()[None]


def read_image(path: str | Path, what: str = "image") -> Image.Image:
    """An image file, fully decoded; a missing, truncated or non-image file is a ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file {str(p)!r} not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        img = Image.open(p)
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError)
        raise ValueError(f"cannot read {what} {str(p)!r} ({type(e).__name__}: {e}): save it as PNG/JPEG") from None
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(
            f"{what} {str(p)!r} has {img.n_frames} frames (an animation): save the one frame to use as PNG"
        )
    return ImageOps.exif_transpose(img)  # a camera's EXIF orientation applied: the pixels as the photo is seen


def as_references(reference, min_side: int = 1) -> list[torch.Tensor]:
    """None / one image / a list of images -> list of (3, h, w) tensors (each checked as as_image_tensor does)."""
    if reference is None:
        return []
    if isinstance(reference, (list, tuple)):
        return [as_image_tensor(r, f"reference[{i}]", min_side) for i, r in enumerate(reference)]
    return [as_image_tensor(reference, "reference", min_side)]


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


def bbox_of(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the nonzero pixels (x1, y1 exclusive); raises on an empty mask."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    while m.ndim > 2 and m.shape[0] == 1:  # (1, H, W) -> (H, W); a 1-pixel-high mask stays 2-D
        m = m[0]
    m = m > 0.5
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W) or (1, H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        raise ValueError("empty mask: mark at least one pixel of the region to refine (mask > 0.5)")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


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


# ----------------------------------------------------------------------------------------------
# cases from users: a folder with metadata.jsonl (README, "Your own cases")
CASE_FORMAT = (
    "one JSON object per line: draft, reference (a path or a list), mask, target (optional), prompt (optional), "
    "split (train|val|test, optional), id (optional); paths relative to the folder"
)


@dataclass
class Case:
    """One user case: the draft to refine, its reference(s), the mask; target, prompt and split when given.
    Exposes the names a Triplet has (target, reference, extra_refs, draft, mask, ref_mask, meta), so evaluators and
    SFT take either (`require_targets` first where a target is needed)."""

    name: str
    draft: torch.Tensor  # (3, H, W)
    references: list  # of (3, h, w), any size
    mask: torch.Tensor  # (1, H, W) in {0, 1}
    target: torch.Tensor | None  # (3, H, W)
    prompt: str | None
    split: str
    meta: dict = field(default_factory=dict)

    @property
    def reference(self) -> torch.Tensor:
        """The first reference at the draft's size (what banks stack; refine packs references at their own size)."""
        return resize(self.references[0], self.draft.shape[-2:])

    @property
    def extra_refs(self) -> list:
        return [resize(r, self.draft.shape[-2:]) for r in self.references[1:]]

    @property
    def ref_mask(self) -> torch.Tensor:
        return torch.ones_like(self.mask)  # where the region lies in a user's reference is unknown

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return bbox_of(self.mask)

    def resized(self, size: int) -> Case:
        """The case at size x size (SFT batches need one shape; aspect is not kept)."""
        r = lambda x, mode="bicubic": resize(x, size, mode)  # noqa: E731
        return Case(
            self.name,
            r(self.draft),
            [r(x) for x in self.references],
            resize_mask(self.mask, (size, size)),
            None if self.target is None else r(self.target),
            self.prompt,
            self.split,
            self.meta,
        )


def require_targets(cases: Sequence, why: str = "scores") -> None:
    """Refuse, before any work, cases without a target where one is needed (scores, SFT)."""
    for c in cases:
        if getattr(c, "target", None) is None:
            raise ValueError(
                f'case {getattr(c, "name", "?")!r} has no target: {why} need one (add "target" to its line in '
                "metadata.jsonl)"
            )


def _split_of(key: str) -> str:
    """The deterministic split of a case without one: 80 / 10 / 10 by a stable hash of its draft path."""
    u = hash_str(key) % 10
    return "train" if u < 8 else "val" if u == 8 else "test"


def _read_case_file(folder: Path, problems: list[str], rel: str, what: str, kind: Callable | None = as_image_tensor):
    """One file of a case line as a tensor (kind) or a PIL image (kind=None); a problem is noted, not raised."""
    try:
        return kind(read_image(folder / rel, what), f"{what} {rel!r}") if kind else read_image(folder / rel, what)
    except ValueError as e:
        msg = str(e).replace(repr(str(folder / rel)), repr(rel))
        problems.append(msg + (f" in {folder} (paths are relative to the folder)" if msg.endswith("not found") else ""))


def case_id_problem(name) -> str:
    """What is wrong with a case id as an output file name ('' when it is fine): it must be a non-empty string or
    integer, without path separators, not '.'/'..' and not hidden, so outputs stay inside --out, one file per case."""
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        return f"must be a string or an integer, not {type(name).__name__}"
    name = str(name)
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
        return "holds a path separator: an id names one output file inside --out"
    if name.startswith("."):
        return "starts with '.': it would be a hidden file (or leave --out)"
    return ""


def case_id_key(name: str) -> str:
    """An id as a file system sees it (Unicode-normalised, case-folded): two ids with the same key collide."""
    return unicodedata.normalize("NFC", name).casefold()


def load_cases(folder: str | Path, split: str | None = None, preset: str | None = None) -> list[Case]:
    """Every case of a case folder (or those of one split), validated before any work starts: an error
    names the line, the file and the fix, listing every problem found (all of a line's, too). With a preset,
    each case's prompt is checked against what that backbone understands (learned instructions on tiny/mini)."""
    folder = Path(folder)
    prompt_ok = P.prompt_checker(preset) if preset is not None else None
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(f"no metadata.jsonl in {folder}: write {CASE_FORMAT}")
    if not meta.is_file():
        raise ValueError(f"{meta} is a folder, not a file: write the case lines into a file named metadata.jsonl")
    raw = meta.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (what Notepad writes) is read, not refused
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{meta} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}): save the file as UTF-8"
        ) from None
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cases, errors, seen = [], [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg}); write {CASE_FORMAT}")
            continue
        if not isinstance(row, dict) or not all(k in row for k in ("draft", "reference", "mask")):
            errors.append(f"{where}: needs draft, reference and mask; write {CASE_FORMAT}")
            continue
        refs = row["reference"] if isinstance(row["reference"], list) else [row["reference"]]
        kinds = [("draft", row["draft"]), ("mask", row["mask"])] + [("reference", r) for r in refs]
        bad = [f"{k} {v!r} is a {type(v).__name__}" for k, v in kinds if not isinstance(v, str) or not v]
        if bad or not refs:
            why = "; ".join(bad) or "reference is an empty list"
            errors.append(f"{where}: {why}: give file paths (strings), reference one path or a non-empty list of them")
            continue
        key = (row["draft"], row["mask"], tuple(refs))
        if key in seen:
            errors.append(f"{where}: duplicates line {seen[key]} (same draft, mask and reference): remove one of them")
            continue
        seen[key] = n
        sp = row.get("split") or _split_of(row["draft"])
        if sp not in SPLITS:
            errors.append(
                f"{where}: unknown split {sp!r}: use one of {SPLITS} (or leave it out for a deterministic split)"
            )
            continue
        problems: list[str] = []  # every problem of this line, not only the first
        read = functools.partial(_read_case_file, folder, problems)
        draft = read(row["draft"], "draft")
        hw = tuple(draft.shape[-2:]) if draft is not None else None
        mimg = read(row["mask"], "mask", None)
        mask = target = None
        if mimg is not None and hw is not None:
            if tuple(mimg.size[::-1]) != hw:
                problems.append(
                    f"mask {row['mask']!r} is {mimg.size[1]}x{mimg.size[0]} but the draft is {hw[0]}x{hw[1]}: "
                    "save the mask at the draft's size"
                )
            else:
                try:
                    mask = as_mask_tensor(mimg, hw)
                except ValueError as e:
                    problems.append(f"mask {row['mask']!r}: {e}")
        if row.get("target"):
            target = read(row["target"], "target")
            if target is not None and hw is not None and tuple(target.shape[-2:]) != hw:
                problems.append(
                    f"target {row['target']!r} is {target.shape[-2]}x{target.shape[-1]} but the draft is "
                    f"{hw[0]}x{hw[1]}: the target must be the draft's size"
                )
        references = [read(r, "reference") for r in refs]
        if prompt_ok is not None and row.get("prompt") is not None and not prompt_ok(row["prompt"]):
            problems.append(
                f"prompt {row['prompt']!r} is unknown to the {preset} backbone: use one of {P.INSTRUCTIONS} "
                "(free text needs the flux-kontext preset)"
            )
        if problems:
            errors += [f"{where}: {e}" for e in problems]
            continue
        given = row.get("id")
        name = Path(row["draft"]).with_suffix("").as_posix().replace("/", "__") if given is None else given
        why = case_id_problem(name)
        if why:
            errors.append(
                f"{where}: case id {name!r} {why}"
                + ("" if given is not None else ' (from the draft\'s file name): give the line an "id"')
            )
            continue
        name = str(name)
        cases.append(
            Case(
                name,
                draft,
                references,
                mask,
                target,
                row.get("prompt"),
                sp,
                dict(
                    seed=n,
                    content=row.get("content", "user"),
                    degradation=row.get("kind", "user"),
                    split=sp,
                    source=row["draft"],
                    line=n,
                ),
            )
        )
    keys = [case_id_key(c.name) for c in cases]  # ids that name the same file on a case-insensitive disk collide
    dup = sorted({c.name for c, k in zip(cases, keys) if keys.count(k) > 1})
    if dup:
        errors.append(f'{meta}: case ids {dup[:4]} name the same output file: give those lines distinct "id"s')
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {meta}:\n  " + "\n  ".join(errors))
    if not cases:
        raise ValueError(f"{meta} holds no cases: write {CASE_FORMAT}")
    return [c for c in cases if split is None or c.split == split]


def write_cases(
    folder: str | Path,
    cases: Sequence,
    prompts: Sequence[str | None] | None = None,
    splits: Sequence[str | None] | None = None,
    outputs: Sequence[torch.Tensor | None] | None = None,
    extras: Sequence[dict] | None = None,
    append: bool = False,
) -> Path:
    """Write triplets (or Cases) as a case folder (PNG files + metadata.jsonl), e.g. to try the commands on known
    data. append=True adds them after the folder's cases (new ids; the studio saves what was tried this way);
    outputs: a refined image per case, kept as "output"; extras: more fields per line (load_cases ignores both).
    The PNGs are written first and
    metadata.jsonl is replaced atomically last, so an interrupted write never leaves a line without its files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: give a folder for the cases")
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "metadata.jsonl"
    old = meta.read_text().splitlines() if append and meta.exists() else []
    taken = set()
    for n, line in enumerate(old, 1):
        try:
            taken.add(json.loads(line).get("id") if line.strip() else None)
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{meta} line {n} is not a JSON object ({line[:40]!r}): fix or remove it first") from None
    start = len(old)

    def png(x, rel):
        a = (to_numpy(x.clamp(0, 1)) * 255).round().astype(np.uint8)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / rel)
        return rel

    lines = []
    for i, c in enumerate(cases):
        j = start + i
        while f"case{j:03d}" in taken:
            j += 1
        cid = f"case{j:03d}"
        refs = c.references if isinstance(c, Case) else [c.reference, *getattr(c, "extra_refs", [])]
        target = c.target
        names = [png(r, f"{cid}_ref.png" if k == 0 else f"{cid}_ref{k}.png") for k, r in enumerate(refs)]
        row = dict(
            id=cid,
            draft=png(c.draft, f"{cid}_draft.png"),
            mask=png(c.mask, f"{cid}_mask.png"),
            reference=names[0] if len(names) == 1 else names,
        )
        if target is not None:
            row["target"] = png(target, f"{cid}_target.png")
        if outputs and outputs[i] is not None:
            row["output"] = png(outputs[i], f"{cid}_output.png")
        prompt = prompts[i] if prompts else getattr(c, "prompt", None) if isinstance(c, Case) else None
        if prompt:
            row["prompt"] = prompt
        if splits and splits[i]:
            row["split"] = splits[i]
        row.update(extras[i] if extras else {})
        lines.append(json.dumps(row))
        taken.add(cid)
    atomic_save(lambda p: Path(p).write_text("\n".join(old + lines) + "\n"), meta)
    return folder
