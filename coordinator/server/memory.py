"""Giving memory back to the system after a burst of large messages (glibc only; a no-op
elsewhere).

Python frees a large message's buffers, but glibc's allocator keeps freed heap memory for
reuse, and after large frees it raises the size above which it maps buffers separately (and
unmaps them on free). Left alone, one burst of 4 MiB envelopes leaves the coordinator's
resident memory hundreds of MB above its idle size. So the coordinator fixes that threshold
(``mallopt(M_MMAP_THRESHOLD)``: large buffers always come from, and go back to, the system)
and trims the heap now and then (``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()


def fix_mmap_threshold() -> bool:
    """Map buffers of ``MMAP_THRESHOLD`` bytes and more separately, always."""
    return bool(_LIBC and _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Return the free memory at the top of the heap (and of its arenas) to the system."""
    return bool(_LIBC and _LIBC.malloc_trim(0))
