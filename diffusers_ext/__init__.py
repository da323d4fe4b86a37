"""diffusers-ext: faster, paper-faithful attention for Hugging Face diffusers pipelines.

    import diffusers_ext as dx
    dx.patch(pipe, "agent")      # one line; dx.unpatch(pipe) restores the pipeline exactly
    dx.methods()                 # what is available, for which models, with which options
"""

from .patching import PatchRecord, methods, patch, patch_record, patched, unpatch

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "patched", "patch_record", "methods", "PatchRecord", "__version__"]
