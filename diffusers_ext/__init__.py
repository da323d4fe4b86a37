"""diffusers-ext: faster, paper-faithful attention for Hugging Face diffusers pipelines.

    import diffusers_ext as dx
    dx.patch(pipe, "agent")      # one line; dx.unpatch(pipe) restores the pipeline exactly
    dx.methods()                 # what is available, for which models, with which options

The extension API (docs/add_a_method.md): `Method`, `Option`, `register_method`, the option checks
(`number`, `one_of`, `boolean`, `schedule`), the processor bases `PatchProcessor`,
`SelfAttentionProcessor` and `JointAttentionProcessor`, and `Family` / `register_family`.
"""

from .errors import DiffusersExtError, OptionError, PatchError, UnsupportedModelError
from .families import AttentionSite, Family, families, family_of, register_family
from .joint import JointAttentionMethod, JointAttentionProcessor
from .patching import PatchRecord, methods, patch, patch_record, patched, unpatch
from .processor import PatchProcessor, SelfAttentionProcessor, compose_with
from .registry import STEPS, Method, Option, boolean, number, one_of, parse_options, register_method, schedule

__version__ = "0.1.0"
__all__ = [
    # the one-line patch
    "patch", "unpatch", "patched", "patch_record", "methods", "PatchRecord", "parse_options",
    # extending: methods, options, processor bases, families
    "Method", "Option", "STEPS", "register_method", "number", "one_of", "boolean", "schedule",
    "PatchProcessor", "SelfAttentionProcessor", "compose_with", "JointAttentionProcessor", "JointAttentionMethod",
    "Family", "AttentionSite", "register_family", "families", "family_of",
    # errors
    "DiffusersExtError", "OptionError", "UnsupportedModelError", "PatchError",
    "__version__",
]
