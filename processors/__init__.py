"""One file per method. Importing this package imports every module in it, and each module
registers its method(s) with `diffusers_ext.registry.register_method`."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
