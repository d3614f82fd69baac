"""Shared fixtures: the tiny random-weight model, built once per session (it is read-only), and one
torch thread for a module of compiling tests."""

import pytest
import torch

from pipeline import random_components


@pytest.fixture(scope="session")
def tiny_components():
    torch.set_num_threads(2)
    return random_components("tiny", dtype=torch.float32, device="cpu", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: compiling is mostly serial, and these cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
