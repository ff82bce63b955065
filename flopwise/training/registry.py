"""compiled.json in flopwise's cache folder: what was measured or compiled on this machine, kept between processes
(graphs compiled before, measured rates, the faster precision, kernel and passes by shape), so each is measured
once per machine. Sweep workers update it at once, under a file lock; a damaged or unwritable file only costs a
measurement again."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flopwise.fsutil import atomic_write_text, cache_root, file_lock


def _path() -> Path:
    return cache_root() / "compiled.json"


def read() -> dict:
    """compiled.json: {"keys": graphs compiled here before, "rates": measured compiled FLOP/s by key and
    threads (and the C step's, by shape, micro-batch, threads, precision, passes and C source), "precision": the
    faster eager precision by shape, micro-batch and threads, "kernel": whether the C training step beats PyTorch
    eager, and in which precision ("torch", "c:fp32", "c:bf16"), likewise, "passes": the C step's sequences a pass
    (0: all)}; an older file is a list of keys."""
    empty = {"keys": [], "rates": {}, "precision": {}, "kernel": {}, "passes": {}}
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return empty
    if isinstance(data, list):
        return {**empty, "keys": [k for k in data if isinstance(k, str)]}
    if not isinstance(data, dict):
        return empty
    keys, rates = data.get("keys"), data.get("rates")

    def choices(name: str, allowed: tuple[str, ...]) -> dict:
        section = data.get(name)
        return {k: v for k, v in section.items() if v in allowed} if isinstance(section, dict) else {}

    return {"keys": [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else [],
            "rates": {k: v for k, v in rates.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}
            if isinstance(rates, dict) else {},
            "precision": choices("precision", ("bf16", "fp32")),
            "kernel": choices("kernel", ("torch", "c:fp32", "c:bf16")),
            "passes": {k: v for k, v in data["passes"].items() if type(v) is int and v >= 0}
            if isinstance(data.get("passes"), dict) else {}}


def _save(reg: dict) -> None:
    reg = {"keys": reg["keys"][-500:], **{name: dict(list(reg[name].items())[-500:])
                                          for name in ("rates", "precision", "kernel", "passes")}}
    try:
        atomic_write_text(_path(), json.dumps(reg) + "\n")
    except OSError:
        pass  # the registry only sharpens decisions and estimates


def _lock():
    """compiled.json's lock (a sibling file): sweep workers update the registry at once, and a read, change and
    write of one would otherwise drop another's entry."""
    return file_lock(str(_path()) + ".lock")


def update(change):
    """Apply ``change(registry)`` to compiled.json under its lock, read afresh; returns what ``change`` returns."""
    with _lock():
        reg = read()
        out = change(reg)
        _save(reg)
    return out


def compiled_before(key: str) -> bool:
    return key in read()["keys"]


def remember_compiled(key: str) -> None:
    if key not in read()["keys"]:
        update(lambda reg: add_key(reg, key))


def add_key(reg: dict, key: str) -> None:
    if key not in reg["keys"]:
        reg["keys"].append(key)
