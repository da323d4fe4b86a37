"""Pipelines diffusers lacks: SiT (flow-matching DiT) and checkpoint converters.

Imported lazily: `from diffusers_ext.pipelines import SiTPipeline` loads `sit.py` on first use."""

_EXPORTS = {
    "SiTPipeline": "sit", "SiTScheduler": "sit",
    "convert_dit_checkpoint": "convert", "use_original_time_embedding": "convert",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
