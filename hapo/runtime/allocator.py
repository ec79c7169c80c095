"""The memory allocator of a service's process: tcmalloc where it is installed.

glibc's malloc serves every block over 32 MiB (and, by its adaptive threshold, many
smaller ones) with a fresh ``mmap`` and unmaps it at ``free``. A training step allocates and
frees the same large tensors again and again (the ``[V, H]`` gradient of the embedding,
each autocast copy of a weight, each chunk of vocabulary logits), so every step faults all
those pages in again and zero-fills them in the kernel: on this project's 2-core CPU VMs a
135M-parameter learner step spent a quarter of its time in ``copy_`` and ``fill_`` of fresh
memory. tcmalloc keeps freed memory for reuse. vLLM's CPU backend asks for it too (it warns
"libtcmalloc is not found in LD_PRELOAD"), as do PyTorch's CPU performance guides.

An allocator is chosen before the process starts (``LD_PRELOAD``), so ``hapo rollout``,
``reward``, ``trainer``, ``eval`` and ``bench`` re-execute themselves once with it preloaded
(``exec_with_allocator``); what they start (vLLM's engine core, Ray's workers) inherits it.
``runtime.allocator`` decides: ``auto`` takes tcmalloc when the system has it (Debian:
``libtcmalloc-minimal4``, which ``make setup`` and the CPU image install), ``tcmalloc``
requires it, ``system`` keeps the C library's.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path
from typing import Literal

Allocator = Literal["auto", "tcmalloc", "system"]

TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
"""Libraries tried, in order: the allocator alone, then gperftools' full one."""


def find_tcmalloc() -> str | None:
    """The soname of an installed tcmalloc (``libtcmalloc_minimal.so.4``), as the dynamic
    linker finds it, or None."""
    for name in TCMALLOC_NAMES:
        if found := ctypes.util.find_library(name):
            return found
    return None


def loaded_libraries(maps: Path = Path("/proc/self/maps")) -> set[str]:
    """File names of the shared objects mapped into this process (empty off Linux)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return set()
    return {Path(line.split()[-1]).name for line in lines if "/" in line and ".so" in line}


def preload(library: str, ld_preload: str) -> str:
    """``LD_PRELOAD`` with ``library`` first and what it held after it: the first object
    preloaded that defines ``malloc`` is the one every library gets."""
    kept = [entry for entry in ld_preload.replace(" ", ":").split(":") if entry]
    return ":".join([library, *(entry for entry in kept if entry != library)])


def choose(allocator: Allocator, found: str | None) -> str | None:
    """The library to preload for ``runtime.allocator`` given what is installed (None:
    the C library's malloc).

    Raises:
        ValueError: ``tcmalloc`` was asked for and none is installed.
    """
    if allocator == "system":
        return None
    if allocator == "tcmalloc" and found is None:
        raise ValueError(
            "runtime.allocator: tcmalloc is not installed (Debian/Ubuntu: apt-get install "
            "libtcmalloc-minimal4); use auto or system to run without it"
        )
    return found


def exec_with_allocator(allocator: Allocator) -> None:
    """Re-execute this process with ``allocator``'s library preloaded, unless it is loaded
    already or none is wanted; returns only then. Arguments, process id, CPU affinity and
    parent-death signal are kept (``execv``).

    Raises:
        ValueError: as ``choose``.
    """
    # Loaded already (after the exec, or preloaded by the user): nothing to find. The file
    # mapped is the one the soname links to, libtcmalloc_minimal.so.4.5.10.
    if allocator == "system" or any(n.startswith("libtcmalloc") for n in loaded_libraries()):
        return
    library = choose(allocator, find_tcmalloc())
    if library is None:
        return
    ld_preload = os.environ.get("LD_PRELOAD", "")
    if library in ld_preload.split(":"):
        # Preloaded and yet not mapped: the dynamic linker refused it (it said why on
        # stderr). Go on with the C library's malloc rather than exec again.
        print(f"warning: {library} is in LD_PRELOAD but not loaded; using the system's "
              "malloc", file=sys.stderr)  # fmt: skip
        return
    os.environ["LD_PRELOAD"] = preload(library, ld_preload)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
