import functools
import logging

import pytest
import torch

from diffusers_ext.testing import tiny_pipeline

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
logging.getLogger("diffusers").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=None)
def _cached_pipeline(family: str):
    return tiny_pipeline(family)


@pytest.fixture
def pipeline_of():
    """A tiny pipeline per family, built once per session; each test must leave it unpatched."""

    def get(family: str):
        pipe = _cached_pipeline(family)
        from diffusers_ext import patch_record, unpatch

        if patch_record(pipe) is not None:  # a failed test left it patched: never leak into the next
            unpatch(pipe)
        return pipe

    return get
