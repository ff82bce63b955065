"""The trainer's allocator setting: blocks up to 32 MB come from the heap, which is not trimmed, so what one step
frees the next reuses instead of mapping (and faulting in) fresh pages."""

import json
import platform
import subprocess
import sys

import pytest

MAPPED = r"""
import ctypes, json, sys, torch
from flopwise.training.malloc import keep_freed_memory
set_ = sys.argv[1] == "set" and keep_freed_memory()

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

info = ctypes.CDLL("libc.so.6").mallinfo2
info.restype = Mallinfo2
before = info().hblkhd  # bytes in blocks mmap serves
y = torch.empty(6 << 20)  # 24 MB, the first block this large: glibc as it starts maps it
print(json.dumps({"set": set_, "mapped": info().hblkhd - before}))
"""


def _mapped(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MAPPED, mode], capture_output=True, text=True, timeout=120)
    if done.returncode and "mallinfo2" in done.stderr:
        pytest.skip("no glibc 2.33+ (mallinfo2)")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc: the allocator is left as it is")
def test_training_blocks_come_from_the_heap_not_fresh_mappings():
    kept = _mapped("set")
    assert kept["set"]  # glibc took both settings
    assert _mapped("plain")["mapped"] >= 24 << 20  # glibc as it starts: a fresh mapping
    assert kept["mapped"] == 0
