"""C sources built once per machine with the system C compiler and loaded with ctypes (standard library only).

flopwise has two: the decode step (``infer/step.c``) and the training step (``training/step.c``). ``load`` compiles
a source into flopwise's cache folder (``BASE_FLAGS``, ``-march=native``, OpenMP where the compiler has it), keyed
by the source, the flags, the compiler and its version, and the CPU it targets, so a build is reused until one of
them changes; it raises ``NativeUnavailable`` with the reason where no compiler builds it. ``Builds`` keeps one
source's default build (and a failure to build it) for the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from flopwise.fsutil import cache_root, file_lock


class NativeUnavailable(Exception):
    """A C step cannot be built or used here; the message says why."""


# Every build's flags (the key of a cached build includes them). -fno-math-errno: sqrtf in a loop then vectorises
# (with errno, GCC kept AdamW's update scalar, with a call to sqrtf: 0.58 ms instead of 0.10 ms at d_model 64); the
# results are IEEE's either way, and nothing here reads errno.
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fno-math-errno")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _target(cc: str) -> str:
    """What -march=native compiles for, as the compiler sees it (its predefined macros name every instruction set
    it enables), so that a cache folder shared between machines never hands one CPU another's build."""
    r = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                       timeout=60)
    return r.stdout if r.returncode == 0 else platform.processor()


def load(source: Path, what: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """``source`` built (about a second) or loaded from the cache; ``what`` names it in errors ("the C decode
    step"); ``flags`` adds compiler flags (the tests build AVX2 and plain-C variants with -mno-avx512f, -mno-avx2)."""
    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc, gcc or clang; or set CC)")
    try:
        text = source.read_bytes()
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(b"\0".join([text, cc.encode(), version.encode(), _target(cc).encode(),
                                         platform.machine().encode(), " ".join((*BASE_FLAGS, *flags)).encode()])
                             ).hexdigest()[:16]
        path = cache_root() / "native" / f"{source.parent.name}-{source.stem}-{key}.so"
        if not path.exists():
            # one build at a time: a sweep's workers, started while the parent builds, wait for its build
            with file_lock(path.with_suffix(".lock")):
                if not path.exists():
                    _build(cc, source, what, path, list(flags))
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:  # an unwritable or noexec cache folder, a missing source
        raise NativeUnavailable(f"{what}: {e}") from None


def _build(cc: str, source: Path, what: str, path: Path, extra: list[str]) -> None:
    """Compile into a temporary sibling, load it, and rename: a process that dies mid-build leaves no half
    library, two processes building at once each rename a whole one, and a build that links but does not load
    (an OpenMP runtime the loader cannot find) is never cached: the next flags are tried."""
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # OpenMP first (the products split across threads); a compiler without it (Apple clang) builds a serial step,
    # still vectorised (-fopenmp-simd honours the simd pragmas alone)
    for flags in (["-march=native", "-fopenmp"], ["-march=native", "-fopenmp-simd"], ["-fopenmp"],
                  ["-fopenmp-simd"], []):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".so.tmp")
        os.close(fd)
        try:
            r = subprocess.run([cc, *BASE_FLAGS, *flags, *extra, str(source), "-o", tmp, "-lm"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                ctypes.CDLL(tmp)
                os.replace(tmp, path)
                return
            errors.append((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f"{cc} could not build {what}: {errors[0][:160]}")


class Builds:
    """``builds(flags)``: ``source`` built by ``load`` and declared by ``declare`` (its functions' ctypes signatures).
    The default build (no flags) is loaded once a process and a failure to build it is remembered (``lib``,
    ``failed``), so that no caller tries the compiler twice; the tests build variants with flags."""

    def __init__(self, source: Path, what: str, declare: Callable[[ctypes.CDLL], None]):
        self.source, self.what, self.declare = source, what, declare
        self.lib: ctypes.CDLL | None = None
        self.failed: str | None = None

    def __call__(self, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
        if not flags and self.lib is not None:
            return self.lib
        if not flags and self.failed is not None:
            raise NativeUnavailable(self.failed)
        try:
            lib = load(self.source, self.what, flags)
        except NativeUnavailable as e:
            if not flags:
                self.failed = str(e)
            raise
        self.declare(lib)
        if not flags:
            self.lib = lib
        return lib
