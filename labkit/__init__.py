"""labkit: a notebook workbench for reference-guided refinement of AI-generated images.

labkit.refine(draft, mask, reference) and labkit.generate(image, prompt, references) are
labkit.inference's; labkit.load(preset) gives a Backbone. docs/ARCHITECTURE.md shows the floors."""

from .inference import generate, refine
from .models import Backbone, load, memory_options
from .presets import PRESETS

__all__ = ["Backbone", "load", "memory_options", "refine", "generate", "PRESETS"]
__version__ = "0.1.0"
