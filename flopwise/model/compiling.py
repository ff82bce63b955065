"""torch.compile's settings for flopwise's training (the decoder's C step is built by flopwise.infer.native)."""

from __future__ import annotations

import os
import shutil

import torch

from flopwise.fsutil import cache_root

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def can_compile(device: torch.device) -> bool:
    """Whether auto may compile here: a CPU (CUDA stays eager unless asked) with a C++ compiler for inductor."""
    return device.type == "cpu" and any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))


def use_compile_cache() -> None:
    """Settings for flopwise's compiles. Inductor's cache beside flopwise's own (unless the user placed it
    elsewhere), so that 'compiled before' stays true as long as the cache does (inductor's default lives in /tmp);
    kernels that read the thread count when they run, not when they were compiled, so that a compiled run still
    follows CpuShare to fewer threads while other processes are busy."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = os.path.abspath(default_cache_dir())
    except ImportError:
        default = None
    current = os.environ.get(INDUCTOR_CACHE_ENV)
    if current is None or os.path.abspath(current) == default:  # inductor writes its default into the variable
        os.environ[INDUCTOR_CACHE_ENV] = str(cache_root() / "inductor")
    try:
        import torch._inductor.config as inductor_config
        inductor_config.cpp.dynamic_threads = True
    except (ImportError, AttributeError):
        pass
