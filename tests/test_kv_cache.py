"""The prompt's cross-attention K/V cache gives the same UNet output as no cache."""

import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.attention import CrossAttentionCache


def unet_on_cached_kv(unet, cache, latents, timesteps, embeds):
    """The UNet's output with `embeds`' K/V active in `cache`, and zeros for the embeddings it is
    given (so only the cache can bring the prompt in)."""
    cache.active = cache.compute(embeds)
    try:
        return unet(latents, timesteps, encoder_hidden_states=torch.zeros_like(embeds)).sample
    finally:
        cache.active = None


def test_cached_kv_equals_plain_attention(tiny_components):
    unet = tiny_components.unet
    embeds = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([999, 500, 20])
    with torch.no_grad():
        plain = unet(latents, timesteps, encoder_hidden_states=embeds).sample
        cache = CrossAttentionCache.install(unet)
        cross_attention = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
        assert len(cache.layers) == len(cross_attention) == 4  # down, mid and two in the up block
        cached = unet_on_cached_kv(unet, cache, latents, timesteps, embeds)
        assert (cached - plain).abs().max().item() <= 1e-5
        # with no active cache the processors fall back to computing K/V from the embeddings
        assert (unet(latents, timesteps, encoder_hidden_states=embeds).sample - plain).abs().max().item() <= 1e-6


def test_engine_with_and_without_cache_gives_same_frames(tiny_components):
    outputs = []
    frames = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    for kv_cache in (True, False):
        config = StreamConfig(width=64, height=64, device="cpu", cfg_type="full", guidance_scale=2.0, kv_cache=kv_cache, t_index_list=(20, 40))
        engine = StreamDiffusion(tiny_components, config)
        engine.set_prompt("a harbour", negative_prompt="rain")
        outputs.append([engine(frame) for frame in frames])
    for cached, plain in zip(*outputs):
        assert (cached - plain).abs().max().item() <= 1e-5


def test_cache_is_recomputed_only_when_the_prompt_changes(tiny_components):
    config = StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 40))
    engine = StreamDiffusion(tiny_components, config)
    computed = []
    original = engine.backend.cache.compute
    engine.backend.cache.compute = lambda embeds: computed.append(embeds.shape[0]) or original(embeds)
    for _ in range(3):
        engine(torch.rand(3, 64, 64))
    assert computed == [2]  # once, for the (2 cond rows) layout
    engine.set_prompt("another")
    engine(torch.rand(3, 64, 64))
    assert computed == [2, 2]


def test_a_second_engine_on_the_same_unet_shares_the_cache_and_unhooks_nothing(tiny_components):
    """Engines built on the same components (a benchmark's engines, a fallback) share one cache:
    each call makes its own K/V active on its thread, so the first engine keeps reading its own."""
    config = StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 40))
    first = StreamDiffusion(tiny_components, config)
    first.set_prompt("a harbour")
    processors = [module.processor for name, module in tiny_components.unet.named_modules() if name.endswith("attn2")]
    second = StreamDiffusion(tiny_components, config)
    assert second.backend.cache is first.backend.cache
    assert [module.processor for name, module in tiny_components.unet.named_modules() if name.endswith("attn2")] == processors
    # the first engine's UNet calls read the K/V it made active (its embeddings never reach the processors)
    seen, originals = [], [processor.fallback for processor in processors]
    for processor, original in zip(processors, originals):
        processor.fallback = lambda *args, original=original, **kwargs: seen.append(1) or original(*args, **kwargs)
    try:
        first(torch.rand(3, 64, 64))
    finally:
        for processor, original in zip(processors, originals):
            processor.fallback = original
    assert not seen, "a cross-attention layer computed K/V from the embeddings: the cache was not read"
