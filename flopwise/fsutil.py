"""File-system helpers shared by every layer (standard library only)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from flopwise.errors import FlopwiseError


def cache_root() -> Path:
    """flopwise's cache folder: $FLOPWISE_CACHE, else ~/.cache/flopwise (prepared corpora, hardware probe)."""
    root = os.environ.get("FLOPWISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flopwise")
    return Path(root)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created; flock) for the block, between processes of this machine;
    where the file cannot be created (an unwritable folder) or locked (a file system without flock), no lock:
    callers then risk only repeated work."""
    f = None
    try:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        if f is not None:
            f.close()  # closing releases the lock


def check_output_dir(path: str | os.PathLike, option: str, ours: Callable[[Path], bool]) -> None:
    """The one rule for an output folder: new, empty, or one flopwise made (``ours``); a file, or a folder of
    other files, is refused before anything is written, so nothing the user had is replaced."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FlopwiseError(f"{option} {path} is a broken link: give a folder (a new or empty one)")
    if path.exists() and not path.is_dir():
        raise FlopwiseError(f"{option} {path} is a file: give a folder (a new or empty one)")
    try:
        other = path.is_dir() and not ours(path) and any(path.iterdir())
    except OSError as e:
        raise FlopwiseError(f"cannot read {option} {path} ({e.strerror}): give a folder you can write to") from None
    if other:
        raise FlopwiseError(f"{option} {path} holds other files: give a new or empty folder (flopwise writes only "
                            "into folders it made)")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_temp_sibling(name: str, of: str) -> bool:
    """Whether the file name ``name`` is a temp sibling of the file ``of`` as atomic_write_text (and the writes
    that follow it) names one: '.config.json.k2j4x9.tmp'. A kill between the write and the rename leaves one."""
    return name.startswith(f".{of}.") and name.endswith(".tmp")


def usual_mode(path: str | os.PathLike) -> None:
    """Give a temp file (mkstemp: 0600) or folder (mkdtemp: 0700) the mode the user's umask gives new ones."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_array(text: str, source: str) -> list:
    """A JSON document's value (a file holding a JSON array); a parse error names the line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FlopwiseError(f"{source} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def json_line(line: str, number: int, source: str) -> object:
    """The value on line ``number`` (1-based) of a JSONL file; a parse error names the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise FlopwiseError(f"{source}: line {number} is not valid JSON ({e.msg}); JSONL needs one record per "
                            "line") from None


def parse_records(text: str, source: str) -> list[tuple[str, object]]:
    """Records of a JSON array or of JSONL (one value per line, blank lines skipped), each with where it
    came from ("record 3" or "record 3 (line 5)") for error messages; a parse error names the line."""
    if text.lstrip().startswith("["):
        return [(f"record {i}", r) for i, r in enumerate(json_array(text, source))]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append((f"record {len(out)} (line {n})", json_line(line, n, source)))
    return out
