"""Shared fixtures: the tiny random-weight model, built once per session (it is read-only)."""

import pytest
import torch

from pipeline import random_components


@pytest.fixture(scope="session")
def tiny_components():
    torch.set_num_threads(2)
    return random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
