"""Image captioning from Python: a trained checkpoint in, captions and where each word looked out.

    from captioner import DecodeOptions, Predictor

    predictor = Predictor.from_checkpoint("model.safetensors")
    results = predictor.caption(["photo.jpg"], DecodeOptions(beam_size=5))
    print(results[0]["captions"][0]["text"])

The names in `__all__` are the library's public surface, walked through in docs/python.md:

- `Predictor`: a model loaded from a checkpoint; `caption()` takes paths, bytes or PIL images.
- `DecodeOptions`: how to decode (beam search, greedy or sampling; captions per image; attention).
- `ImageError`: what `caption()` raises for an input that is not a usable image.
- `heatmap_overlay`: one word's attention grid drawn over the picture.

Each is imported on first use (PEP 562), so `import captioner` alone does not import torch: a
program that only names the package, or a command's `--help`, starts fast.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports them
    from .decoding import DecodeOptions
    from .images import ImageError
    from .overlay import heatmap_overlay
    from .predictor import Predictor

__all__ = ["DecodeOptions", "ImageError", "Predictor", "heatmap_overlay"]

_MODULES = {  # each public name -> the module that defines it
    "DecodeOptions": ".decoding",
    "ImageError": ".images",
    "Predictor": ".predictor",
    "heatmap_overlay": ".overlay",
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name], __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
