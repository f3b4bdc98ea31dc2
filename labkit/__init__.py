"""labkit: a notebook workbench for reference-guided refinement of AI-generated images."""
from .models import Backbone, load
from .presets import PRESETS

__all__ = ["Backbone", "load", "PRESETS"]
__version__ = "0.1.0"
