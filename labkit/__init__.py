"""labkit: a notebook workbench for reference-guided refinement of AI-generated images."""

from .models import Backbone, load
from .presets import PRESETS

__all__ = ["Backbone", "load", "refine", "generate", "PRESETS"]
__version__ = "0.1.0"


def refine(
    image,
    mask,
    reference=None,
    method: str | None = None,
    adapter: str | None = None,
    steps: int | None = None,
    seed: int | None = 0,
    preset: str = "mini",
    prompt: str | None = None,
    **kw,
):
    """Refine the masked region of `image` from reference image(s); a PIL image of the input's size.

    methods: input | paste | paste_warp | full | focus | align | align_box (None: the default chosen on val,
    labkit.inference.REFINE_DEFAULTS); see labkit.inference (imported on first use)."""
    from .inference import refine as _refine

    return _refine(image, mask, reference, method, adapter, steps, seed, preset, prompt=prompt, **kw)


def generate(image, prompt: str, references=None, **kw):
    """Kontext-style whole-image editing -> PIL image; see labkit.inference.generate (imported on first use)."""
    from .inference import generate as _generate

    return _generate(image, prompt, references, **kw)
