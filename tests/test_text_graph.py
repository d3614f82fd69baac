"""The text encoder's graph plumbing on the CPU (pipeline/text_graph.py): EncoderGraph with
replay="eager" runs the encoder on the same static buffers at every call, which is what a CUDA
graph replays; the CUDA capture itself is checked on a GPU by bench/graph_check.py."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from pipeline.prompts import PromptEncoder
from pipeline.text_graph import EncoderGraph, encoder_graph

PROMPTS = ["a lighthouse in a storm", "", "neon city at night, rain, cinematic", "a lighthouse in a storm"]


def _encoders(components, graph):
    plain = PromptEncoder(components.tokenizer, components.text_encoder, cache_size=8)
    graphed = PromptEncoder(components.tokenizer, components.text_encoder, cache_size=8, graph=graph)
    return plain, graphed


def test_graph_embeddings_equal_the_plain_encoders_for_every_prompt(tiny_components):
    plain, graphed = _encoders(tiny_components, "eager")
    assert plain.graph is None and isinstance(graphed.graph, EncoderGraph)
    for prompt in PROMPTS:
        expected, got = plain.encode(prompt), graphed.encode(prompt)
        assert got.shape == expected.shape == (1, 77, tiny_components.text_encoder.config.hidden_size)
        assert got.dtype == expected.dtype and torch.equal(got, expected), prompt
    assert graphed.graph.replays == 3  # the repeated prompt came from the cache


def test_buffers_stay_put_and_each_result_is_its_own_memory(tiny_components):
    graph = EncoderGraph(tiny_components.text_encoder, 77, replay="eager")
    tokens, output = graph.tokens.data_ptr(), graph.output.data_ptr()
    ids = [torch.randint(0, 400, (1, 77)) for _ in range(3)]
    results = [graph(token_ids) for token_ids in ids]
    assert (graph.tokens.data_ptr(), graph.output.data_ptr()) == (tokens, output)  # what a graph reads and writes
    assert all(result.data_ptr() != output for result in results)
    # a later call does not change an earlier result
    with torch.inference_mode():
        expected = tiny_components.text_encoder(ids[0])[0]
    assert torch.equal(results[0], expected)
    assert not torch.equal(results[0], results[1])


def test_concurrent_encodes_each_get_their_own_prompt(tiny_components):
    plain, graphed = _encoders(tiny_components, "eager")
    prompts = [f"prompt number {k}" for k in range(8)]
    expected = {prompt: plain.encode(prompt) for prompt in prompts}
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def encode(mine: list[str]) -> None:
        try:
            for prompt in mine:
                got[prompt] = graphed.graph(graphed.tokenizer(
                    prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(prompts[k::2],)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert all(torch.equal(got[prompt], expected[prompt]) for prompt in prompts)


def test_bad_token_shapes_and_modes_are_named(tiny_components):
    graph = EncoderGraph(tiny_components.text_encoder, 77, replay="eager")
    with pytest.raises(ValueError, match=r"token_ids: shape \(1, 76\), the graph takes \(1, 77\)"):
        graph(torch.zeros(1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="replay: 'sometimes' must be one of cuda, eager"):
        EncoderGraph(tiny_components.text_encoder, 77, replay="sometimes")
    with pytest.raises(ValueError, match="needs the text encoder on a CUDA device, it is on cpu"):
        EncoderGraph(tiny_components.text_encoder, 77, replay="cuda")


def test_a_failed_capture_is_logged_and_prompts_are_encoded_without_a_graph(tiny_components, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.text_graph"):
        assert encoder_graph(tiny_components.text_encoder, 77, replay="cuda") is None
        plain, graphed = _encoders(tiny_components, "cuda")  # on the CPU: no CUDA graph can be made
    assert graphed.graph is None
    assert "could not capture the text encoder in a CUDA graph (ValueError: replay: 'cuda' needs" in caplog.text
    assert torch.equal(graphed.encode("a lighthouse"), plain.encode("a lighthouse"))


def _eager_replay_backend(monkeypatch):
    """Backends made with the stream's step graphs in the CPU replay mode ("eager"), as on CUDA
    they would be made with "cuda": the stream then sets up both graphs itself."""
    import pipeline.stream

    make = pipeline.stream.make_backend

    def make_with_graphs(*args, **kwargs):
        backend = make(*args, **kwargs)
        backend.step_graphs = "eager"
        return backend

    monkeypatch.setattr(pipeline.stream, "make_backend", make_with_graphs)


def test_a_stream_with_step_graphs_encodes_its_prompts_through_the_graph(tiny_components, monkeypatch):
    import numpy as np

    from pipeline import StreamConfig, StreamDiffusion

    config = StreamConfig(width=64, height=64, device="cpu", dtype="float32", t_index_list=(20, 40), seed=7)
    plain = StreamDiffusion(tiny_components, config)
    _eager_replay_backend(monkeypatch)
    graphed = StreamDiffusion(tiny_components, config)
    without = StreamDiffusion(tiny_components, config.replace(text_encoder_graph=False))
    assert plain.prompts.graph is None and without.prompts.graph is None
    assert isinstance(graphed.prompts.graph, EncoderGraph) and graphed._graphs is not None
    rng = np.random.default_rng(0)
    for prompt in ("a lighthouse", "a harbour at dawn", "a lighthouse"):
        for engine in (plain, graphed):
            engine.set_prompt(prompt, "fog")
        for _ in range(2):
            frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            assert np.array_equal(plain(frame), graphed(frame)), prompt
    assert graphed.prompts.graph.replays == 4  # "", "fog" and the two prompts; the repeat came from the cache
    assert graphed._graphs.replays == 6
