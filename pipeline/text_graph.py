"""The text encoder in one CUDA graph, replayed on a stream of its own.

Why: a new prompt is encoded by the prompt worker, a thread beside the frame loop. Run as it is,
the text encoder is some 300 (SD 1.5's CLIP) to 520 (SD 2.1's OpenCLIP) small kernels, each
launched from Python: milliseconds of CPU on the worker, which holds the GIL between launches
while the frame thread waits for it, and kernels queued on the stream the frames use. Replayed
from a graph it is one launch, on its own stream, so a prompt change costs the frames next to
nothing. The shape never changes (one prompt, padded to the tokenizer's length), so one graph
serves every prompt.

What the graph reads and writes stays where it is: the token ids are copied into `tokens`, the
graph writes `output`, and each call copies `output` out before anyone can replay again.

`replay="eager"` runs the encoder again on the same buffers at every call instead of a CUDA
graph, on any device: how the CPU tests check this plumbing.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)

REPLAYS = ("cuda", "eager")


class EncoderGraph:
    """`graph(token_ids)`: the text encoder's last hidden state (1, tokens, D) in its parameters'
    dtype, for token ids (1, tokens) anywhere. Thread-safe."""

    def __init__(self, text_encoder: torch.nn.Module, tokens: int, *, replay: str = "cuda") -> None:
        if replay not in REPLAYS:
            raise ValueError(f"replay: {replay!r} must be one of {', '.join(REPLAYS)}")
        parameter = next(text_encoder.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if replay == "cuda" and self.device.type != "cuda":
            raise ValueError(f"replay: 'cuda' needs the text encoder on a CUDA device, it is on {self.device}")
        self._encoder = text_encoder
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if replay == "cuda" else None
        self.replays = 0
        with torch.inference_mode():
            self.tokens = torch.zeros(1, tokens, dtype=torch.long, device=self.device)
            if replay == "eager":
                self.output = self._body().clone()
                self._replay = lambda: self.output.copy_(self._body())
            else:
                self.output, self._graph = self._capture()
                self._replay = self._graph.replay

    def _body(self) -> torch.Tensor:
        return self._encoder(self.tokens)[0].to(self.dtype)  # (1, tokens, D)

    def _capture(self) -> tuple[torch.Tensor, torch.cuda.CUDAGraph]:
        with torch.cuda.stream(self._stream):  # a first run outside the capture (lazy initialisations)
            self._body()
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may launch work meanwhile (nothing of theirs is captured)
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            output = self._body()
        return output, graph

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tuple(token_ids.shape) != tuple(self.tokens.shape):
            raise ValueError(f"token_ids: shape {tuple(token_ids.shape)}, the graph takes {tuple(self.tokens.shape)}")
        with self._lock, torch.inference_mode():
            if self._stream is None:
                self.tokens.copy_(token_ids)
                self._replay()
                self.replays += 1
                return self.output.clone()
            with torch.cuda.stream(self._stream):
                self.tokens.copy_(token_ids)
                self._replay()
                hidden = self.output.clone()  # (1, tokens, D), out of the graph's memory
                done = torch.cuda.Event()
                done.record(self._stream)
            # the frames read it on the default stream: its memory is not reused before they are done
            hidden.record_stream(torch.cuda.default_stream(self.device))
            done.synchronize()  # this thread waits (the GIL released), never the frame loop
            self.replays += 1
            return hidden


def encoder_graph(text_encoder: torch.nn.Module, tokens: int, *, replay: str = "cuda") -> EncoderGraph | None:
    """An EncoderGraph, or None (logged) when the encoder cannot be captured: prompts are then
    encoded without a graph, as before; a show never stops for it."""
    started = time.perf_counter()
    try:
        graph = EncoderGraph(text_encoder, tokens, replay=replay)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("could not capture the text encoder in a CUDA graph (%s: %s); prompts are encoded without one",
                    type(exc).__name__, reason)
        log.debug("text encoder capture failure", exc_info=exc)
        return None
    log.info("captured the text encoder (%s replay) in %.2f s", replay, time.perf_counter() - started)
    return graph
