"""Prompt embeddings: encoded once per prompt, kept in a small cache of recent prompts."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .text_graph import encoder_graph


class PromptEncoder:
    """Tokenize and encode prompts to (1, 77, D) embeddings on the engine's device.

    A least-recently-used cache keeps the last `cache_size` prompts, so switching back to a
    recent prompt costs nothing. Thread-safe: a control thread may warm the cache with
    `encode` while the inference thread runs.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, *, cache_size: int, graph: str | None = None) -> None:
        """`graph`: "cuda" to run the encoder as one CUDA graph on a stream of its own
        (pipeline/text_graph.py; encoded without one, logged, where it cannot be captured), or
        "eager" (the same plumbing without a graph, for tests), or None."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by clear()
        self.max_length = min(int(getattr(tokenizer, "model_max_length", 77)), 77)
        self.graph = encoder_graph(text_encoder, self.max_length, replay=graph) if graph else None

    def clear(self) -> None:
        """Forget every cached embedding (the text encoder's weights changed). An encode running
        meanwhile on another thread keeps its result out of the cache: it may have read the old
        weights."""
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def cached(self, prompt: str) -> bool:
        with self._lock:
            return prompt in self._cache

    def encode(self, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden state for `prompt`: (1, 77, D)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__} {prompt!r}")
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                return self._cache[prompt]
            generation = self._generation
        embedding = self._run_encoder(prompt)
        with self._lock:
            if generation != self._generation:
                return embedding
            self._cache[prompt] = embedding
            self._cache.move_to_end(prompt)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    @torch.inference_mode()
    def _run_encoder(self, prompt: str) -> torch.Tensor:
        token_ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (1, 77)
        if self.graph is not None:
            return self.graph(token_ids)
        parameter = next(self.text_encoder.parameters())
        hidden = self.text_encoder(token_ids.to(parameter.device))[0]  # (1, 77, D)
        return hidden.to(parameter.dtype)


BLEND_METHODS = ("linear", "slerp")
MAX_TRANSITION_SECONDS = 60.0


def transition_weight(elapsed: float, seconds: float) -> float:
    """How far a prompt transition of `seconds` is after `elapsed` seconds: 0 at the start, 1 at
    the end and after, eased in and out (smoothstep: no jolt when it starts or lands)."""
    if seconds <= 0.0 or elapsed >= seconds:
        return 1.0
    x = max(0.0, elapsed / seconds)
    return x * x * (3.0 - 2.0 * x)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation along the last dimension (Shoemake 1985); linear where a and b are parallel."""
    a32, b32 = a.float(), b.float()
    a_unit = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b_unit = b32 / b32.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cos = (a_unit * b_unit).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)  # (..., 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-4
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * omega) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe_sin)
    return (wa * a32 + wb * b32).to(a.dtype)


def blend_embeddings(embeddings: list[torch.Tensor], weights: list[float], method: str = "linear") -> torch.Tensor:
    """Weighted blend of prompt embeddings (1, 77, D): a weighted mean, or slerp applied pairwise in order."""
    if method not in BLEND_METHODS:
        raise ValueError(f"method: {method!r} must be one of {', '.join(BLEND_METHODS)}")
    if len(embeddings) != len(weights) or not embeddings:
        raise ValueError(f"prompts: need one weight per prompt and at least one prompt (got {len(weights)} weights)")
    if any(not (w >= 0.0) or w == float("inf") for w in weights) or sum(weights) <= 0.0:
        raise ValueError(f"weights: {list(weights)} must be finite, non-negative and not all zero")
    if method == "linear":
        total = sum(weights)
        return sum(e * (w / total) for e, w in zip(embeddings, weights))
    blended, accumulated = embeddings[0], weights[0]
    for embedding, weight in zip(embeddings[1:], weights[1:]):
        if accumulated + weight > 0.0:
            blended = slerp(blended, embedding, weight / (accumulated + weight))
        accumulated += weight
    return blended
