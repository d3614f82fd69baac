"""Stochastic similarity filter (StreamDiffusion sec. 3.5): skip frames that barely changed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def skip_probability(cosine: float, threshold: float) -> float:
    """P(skip) = max(0, 1 - (1 - cos) / (1 - threshold)) (StreamDiffusion eq. 10)."""
    return max(0.0, 1.0 - (1.0 - cosine) / (1.0 - threshold))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two tensors flattened to vectors, as a 0-dim float32 tensor."""
    return F.cosine_similarity(a.reshape(1, -1).float(), b.reshape(1, -1).float(), dim=1, eps=1e-8)[0]


class SimilarityFilter:
    """Decides per frame whether to skip it, with its own seeded generator (reproducible).

    The reference is the last frame that was processed; a skipped frame does not replace it.
    At most `max_skip` frames in a row are skipped (0: never skip). It never sleeps.
    """

    def __init__(self, *, threshold: float, max_skip: int, seed: int) -> None:
        self.threshold = threshold
        self.max_skip = max_skip
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._reference: torch.Tensor | None = None
        self.consecutive_skips = 0

    def configure(self, *, threshold: float, max_skip: int) -> None:
        self.threshold = threshold
        self.max_skip = max_skip

    def reseed(self, seed: int) -> None:
        self._generator.manual_seed(seed)

    def reset(self) -> None:
        self._reference = None
        self.consecutive_skips = 0

    def snapshot(self) -> tuple:
        """Everything that decides the next frames, for `restore` (an update that failed)."""
        return (self.threshold, self.max_skip, self._generator.get_state(), self._reference, self.consecutive_skips)

    def restore(self, snapshot: tuple) -> None:
        self.threshold, self.max_skip, generator_state, self._reference, self.consecutive_skips = snapshot
        self._generator.set_state(generator_state)

    def decide(self, cosine: float) -> bool:
        """One decision for a frame with this similarity to the reference; updates the skip count."""
        draw = float(torch.rand((), generator=self._generator))  # drawn every frame: decisions depend on seed only
        skip = self.consecutive_skips < self.max_skip and draw < skip_probability(cosine, self.threshold)
        self.consecutive_skips = self.consecutive_skips + 1 if skip else 0
        return skip

    def should_skip(self, images: torch.Tensor) -> bool:
        """Compare with the reference (one scalar read from the device) and decide."""
        if self._reference is None or self._reference.shape != images.shape:
            self._reference = images
            self.consecutive_skips = 0
            return False
        skip = self.decide(float(cosine_similarity(images, self._reference)))
        if not skip:
            self._reference = images
        return skip
