"""Import a package's submodules without running the package's `__init__`.

Some libraries' `__init__` imports far more than the submodules we use, and every module loaded
stays resident for the life of the process. kafka-python's imports the admin client and the whole
consumer although the agent only produces (~1.6 MB RSS); prometheus_client's imports its HTTP
exposition stack (http.server, urllib.request, email, ssl with OpenSSL's libcrypto: ~8 MB RSS)
although kepler-log serves its page with `metrics_http`. `defer_package_init` registers such a
package so that `from pkg.sub import X` and `from pkg import sub` load only `pkg.sub`; the real
`__init__` runs, once and in place, when something asks the package for a name that is not a
submodule (`from kafka import KafkaConsumer`, `kafka.__version__`), so callers see no difference
except the memory they do not pay for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def defer_package_init(name: str) -> bool:
    """Register package `name` without running its `__init__` until a non-submodule name is asked.

    Returns False (and changes nothing) when the package is already imported or is not a plain
    package; call it before the first import of the package or of any of its submodules.
    """
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(attr: str) -> object:  # PEP 562 module hook
        # `from pkg import sub` asks the package for `sub` before it imports it: a submodule is
        # imported on its own, as it would be had `__init__` not imported it.
        sub = f"{name}.{attr}"
        if sub in sys.modules or importlib.util.find_spec(sub) is not None:
            return importlib.import_module(sub)
        # Any other name: run the real __init__ once, in place, then answer from what it defined.
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
