"""Stochastic similarity filter: the skip rate follows the formula, the cap holds, it is reproducible."""

import numpy as np
import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.similarity import SimilarityFilter, cosine_similarity, skip_probability


@pytest.mark.parametrize("cosine", [0.90, 0.985, 0.99, 0.995, 0.999])
def test_skip_rate_matches_formula_over_10000_draws(cosine):
    threshold = 0.98
    similarity = SimilarityFilter(threshold=threshold, max_skip=10**4, seed=3)
    skips = 0
    for _ in range(10_000):
        skip = similarity.decide(cosine)
        skips += skip
        similarity.consecutive_skips = 0  # measure the raw rate, without the cap
    expected = skip_probability(cosine, threshold)
    assert abs(skips / 10_000 - expected) <= 0.02


def test_formula_edges():
    assert skip_probability(1.0, 0.95) == 1.0
    assert skip_probability(0.95, 0.95) == 0.0
    assert skip_probability(0.5, 0.95) == 0.0
    assert skip_probability(0.975, 0.95) == pytest.approx(0.5)


def test_consecutive_skips_are_capped():
    similarity = SimilarityFilter(threshold=0.5, max_skip=3, seed=0)
    decisions = [similarity.decide(1.0) for _ in range(12)]
    assert decisions == [True, True, True, False] * 3


def test_max_skip_zero_never_skips():
    similarity = SimilarityFilter(threshold=0.5, max_skip=0, seed=0)
    assert not any(similarity.decide(1.0) for _ in range(100))


def test_same_seed_same_decisions():
    cosines = np.random.default_rng(0).uniform(0.97, 1.0, size=500)
    runs = []
    for _ in range(2):
        similarity = SimilarityFilter(threshold=0.98, max_skip=5, seed=42)
        runs.append([similarity.decide(float(c)) for c in cosines])
    assert runs[0] == runs[1]
    other = SimilarityFilter(threshold=0.98, max_skip=5, seed=43)
    assert [other.decide(float(c)) for c in cosines] != runs[0]


def test_cosine_similarity_of_tensors():
    a = torch.rand(2, 3, 8, 8)
    assert cosine_similarity(a, a).item() == pytest.approx(1.0)
    assert cosine_similarity(a, -a).item() == pytest.approx(-1.0)


def _engine(components, **overrides):
    config = StreamConfig(
        width=64, height=64, device="cpu", t_index_list=(20, 40), similarity_filter=True,
        similarity_threshold=0.95, similarity_max_skip=4, **overrides,
    )
    return StreamDiffusion(components, config)


def test_identical_frames_skip_without_running_the_unet(tiny_components):
    engine = _engine(tiny_components)
    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    calls = []
    handle = engine.components.unet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        first = engine(frame)
        outputs = [engine(frame) for _ in range(4)]
    finally:
        handle.remove()
    assert len(calls) == 1
    assert engine.stats.frames_skipped == 4
    assert all(np.array_equal(out, first) for out in outputs)
    engine(frame)  # the cap: the fifth identical frame in a row is processed
    assert engine.stats.frames_skipped == 4


def test_very_different_frames_never_skip(tiny_components):
    engine = _engine(tiny_components)
    rng = np.random.default_rng(2)
    for _ in range(6):
        engine(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert engine.stats.frames_skipped == 0
    assert engine.stats.frames_processed == 6
