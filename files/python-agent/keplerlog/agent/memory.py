"""Keep the agent's resident memory close to what it actually holds.

The agent moves megabytes through short-lived buffers (file reads, record payloads, kafka-python
batches and their compressed copies) on two threads. With glibc's defaults that memory tends to
stay resident after it is freed: each thread gets its own malloc arena, and the mmap threshold
rises dynamically after large frees, so later large buffers come from the heap and fragment it.
A fixed 64 KiB mmap threshold returns large buffers to the kernel on free, and two arenas are
plenty for two busy threads. No effect (and no error) on a libc without mallopt.

The other large, fixed part of the resident set is code: kafka-python's package `__init__`
imports the admin client and the whole consumer (group coordinator, fetcher, assignors) although
the agent only produces. `defer_package_init` keeps such a package's `__init__` from running until
something actually asks the package itself for a name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 64 * 1024, arenas: int = 2) -> bool:
    """Apply the glibc malloc settings above; return False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arenas))
    if not ok:
        log.debug("mallopt not applied")
    return ok


def defer_package_init(name: str) -> bool:
    """Register package `name` without running its `__init__` until a name is looked up on it.

    Submodules (`from kafka.producer import KafkaProducer`) import normally through the package's
    `__path__`; the first attribute lookup that misses on the package itself (`from kafka import
    KafkaConsumer`, `kafka.__version__`) runs the real `__init__` then, so callers see no
    difference except the memory the agent never needs (~1.6 MB RSS for kafka-python). Returns
    False (and changes nothing) when the package is already imported or is not a plain package.
    """
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(attr: str) -> object:  # PEP 562 module hook
        # Run the real __init__ once, in place, then answer from what it defined.
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        try:
            return package.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = package
    return True


def deferred(name: str) -> bool:
    """Tell whether package `name` is registered but its `__init__` has not run yet (tests)."""
    module: ModuleType | None = sys.modules.get(name)
    return module is not None and "__getattr__" in module.__dict__
