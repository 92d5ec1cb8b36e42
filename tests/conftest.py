"""Shared fixtures: conformance kits (tiny random models + offline processors) per family."""
from __future__ import annotations

import pytest
import torch

from qzoom_adapters.backbones.llava import LlavaSpec
from qzoom_adapters.backbones.qwen2_5_vl import Qwen2_5_VLSpec
from qzoom_adapters.backbones.qwen3_vl import Qwen3VLSpec
from qzoom_adapters.testing import make_kit


@pytest.fixture(scope="module")
def qwen25():
    return make_kit(Qwen2_5_VLSpec)


@pytest.fixture(scope="module")
def qwen3():
    return make_kit(Qwen3VLSpec)


@pytest.fixture(scope="module")
def llava():
    return make_kit(LlavaSpec)


@pytest.fixture
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy machine they slow it down a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
