"""Prompt embeddings: encoded once per prompt, kept in a small cache of recent prompts."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class PromptEncoder:
    """Tokenize and encode prompts to (1, 77, D) embeddings on the engine's device.

    A least-recently-used cache keeps the last `cache_size` prompts, so switching back to a
    recent prompt costs nothing. Thread-safe: a control thread may warm the cache with
    `encode` while the inference thread runs.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, *, cache_size: int) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

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
        embedding = self._run_encoder(prompt)
        with self._lock:
            self._cache[prompt] = embedding
            self._cache.move_to_end(prompt)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    @torch.inference_mode()
    def _run_encoder(self, prompt: str) -> torch.Tensor:
        max_length = min(int(getattr(self.tokenizer, "model_max_length", 77)), 77)
        token_ids = self.tokenizer(
            prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (1, 77)
        parameter = next(self.text_encoder.parameters())
        hidden = self.text_encoder(token_ids.to(parameter.device))[0]  # (1, 77, D)
        return hidden.to(parameter.dtype)
