"""CPU memory allocation for training and decoding on Linux (glibc).

PyTorch's CPU tensors come straight from `malloc`. glibc serves every block above its mmap
threshold (at most 32 MB) with a fresh `mmap` and returns it to the system on `free`, so each
large tensor of a step (the (B, L, V) logits, their gradient, the (B, H, L, L) transition scores)
is page-faulted in again, one 4 KiB page at a time, on every step: a (8188 x 8000) bf16 matmul
output costs more in page faults than in arithmetic on this machine. `keep_freed_memory` turns
that off (`mallopt(M_MMAP_MAX, 0)`, no trimming), so freed blocks stay in the heap and the next
step reuses them. The process keeps its peak memory for its lifetime, which suits a training or
decoding process. `codat benchmark train` measures the difference side by side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
# mallopt's value is a C int: the largest trim threshold it can take (2 GiB of free memory at the
# heap's top). A larger Python int is cut to its low 32 bits by ctypes: 1 << 40 became 0, which
# trims the heap on every free and page-faults the next step's tensors in again.
_NO_TRIM = 2**31 - 1
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc (musl has no mallopt)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep freed blocks in the heap (`enabled`) or restore glibc's defaults (mmap above the
    threshold, trim on free). Returns whether the setting took effect (False off glibc/Linux)."""
    libc = _libc()
    if libc is None:
        return False
    if enabled:
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1
    else:
        ok = (
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
        )
        libc.malloc_trim(0)
    if not ok:
        log.warning("mallopt refused the memory setting (enabled=%s)", enabled)
    return ok


def keep_freed_memory_on_cpu(device: torch.device | str) -> bool:
    """`keep_freed_memory()` for a process that trains or decodes on `device`, if that is the
    CPU and the environment does not set CODAT_KEEP_FREED_MEMORY=0. Returns whether it took
    effect."""
    if torch.device(device).type != "cpu" or os.environ.get("CODAT_KEEP_FREED_MEMORY") == "0":
        return False
    return keep_freed_memory()
