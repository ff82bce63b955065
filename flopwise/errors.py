"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""


class FlopwiseError(Exception):
    """A problem with the user's input or environment; the message names the fix."""


def require(*rules: tuple[str, object, bool, str]) -> None:
    """Options checked before anything is read or written: each rule is (option, value, ok, what it must be);
    the first that fails is the error, e.g. "--top-p must be in (0, 1], got 1.5"."""
    for option, value, ok, rule in rules:
        if not ok:
            raise FlopwiseError(f"{option} must be {rule}, got {value!r}")


# optional dependencies, each with the pyproject extra that installs it (pip install flopwise: the planner only)
EXTRAS = {"torch": "train", "safetensors": "train", "gguf": "train", "fastapi": "serve", "uvicorn": "serve",
          "pyarrow": "data", "zstandard": "data", "tensorboard": "track", "wandb": "wandb", "ray": "ray",
          "llama_cpp": "interop"}


def install_hint(module: str) -> str:
    """How to install an optional dependency, e.g. "pip install 'flopwise[data]'"."""
    return f"pip install 'flopwise[{EXTRAS[module]}]'"
