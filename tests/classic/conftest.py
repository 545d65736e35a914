"""The classic baselines' tests run on one CPU thread: their tiny models are faster so, and far faster on a
shared, busy machine."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
