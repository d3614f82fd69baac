"""Engine cache keys, manifest and refusal of anything that does not match; ONNX export vs torch."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.backends.engine_cache import EngineCache, EngineCacheError, EngineKey, model_weights_hash

KEY = EngineKey(component="unet", model_hash="ab" * 32, width=512, height=512, batch=2, precision="fp16",
                tensorrt_version="10.7.0", compute_capability="9.0", gpu="NVIDIA H100 80GB HBM3")
CHANGES = dict(component="vae_decoder", model_hash="cd" * 32, width=768, height=256, batch=4, precision="fp32",
               tensorrt_version="10.8.0", compute_capability="8.9", gpu="NVIDIA H200")


@pytest.mark.parametrize("field", list(CHANGES))
def test_every_field_changes_the_key(field):
    other = dataclasses.replace(KEY, **{field: CHANGES[field]})
    assert other.digest != KEY.digest and other.filename != KEY.filename


def test_bad_key_values_name_the_field():
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(KEY, precision="int3")
    with pytest.raises(ValueError, match="model_hash"):
        dataclasses.replace(KEY, model_hash="../../etc")


def test_round_trip_and_refusals(tmp_path):
    cache = EngineCache(tmp_path)
    with pytest.raises(EngineCacheError, match="build it first with: sdbridge build-engines"):
        cache.load(KEY)
    cache.store(KEY, b"engine bytes")
    assert cache.load(KEY) == b"engine bytes" and cache.has(KEY)
    other = dataclasses.replace(KEY, tensorrt_version="10.8.0")
    assert not cache.has(other)
    path = tmp_path / KEY.filename
    path.write_bytes(b"engine bytez")  # tampered
    with pytest.raises(EngineCacheError, match="sha256"):
        cache.load(KEY)
    (tmp_path / other.filename).write_bytes(b"foreign engine")  # not in the manifest
    with pytest.raises(EngineCacheError, match="build it first"):
        cache.load(other)


def test_a_missing_engine_names_what_the_folder_holds_it_for_instead(tmp_path):
    """Engines of the same size built on another GPU or with another TensorRT: the refusal says
    which (the user moved the folder to another machine, or upgraded TensorRT), not only 'none'."""
    cache = EngineCache(tmp_path, rebuild_hint="sdbridge build-engines --model M")
    cache.store(KEY, b"built on an H100")
    cache.store(dataclasses.replace(KEY, width=768), b"another size")
    elsewhere = dataclasses.replace(KEY, gpu="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    with pytest.raises(EngineCacheError) as refused:
        cache.load(elsewhere)
    assert str(refused.value) == (
        f"no unet engine for 512x512 batch 2 fp16 in {tmp_path} (it holds one built for another GPU compute "
        "capability and GPU; this machine: compute capability 8.9, NVIDIA GeForce RTX 4090); build it first with: "
        "sdbridge build-engines --model M")
    same_card_model = dataclasses.replace(KEY, gpu="NVIDIA H100 PCIe")  # same compute capability, another card
    with pytest.raises(EngineCacheError, match=r"another GPU; this machine: NVIDIA H100 PCIe\)"):
        cache.load(same_card_model)
    upgraded = dataclasses.replace(KEY, tensorrt_version="10.9.0")
    with pytest.raises(EngineCacheError, match=r"another TensorRT version; this machine: TensorRT 10.9.0\)"):
        cache.load(upgraded)
    with pytest.raises(EngineCacheError, match=r"another model weights\); build it first"):
        cache.load(dataclasses.replace(KEY, model_hash="ef" * 32))
    with pytest.raises(EngineCacheError, match=r"batch 4 fp16 in \S+; build it first"):  # nothing of that batch
        cache.load(dataclasses.replace(KEY, batch=4))


def test_renamed_engine_is_refused(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"built for 512x512")
    other = dataclasses.replace(KEY, width=768)
    (tmp_path / other.filename).write_bytes((tmp_path / KEY.filename).read_bytes())
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest[other.filename] = manifest[KEY.filename]  # an entry copied under the new name: its key says 512
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineCacheError, match="width"):
        cache.load(other)


def test_model_hash_follows_the_weights(tiny_components):
    first = model_weights_hash(tiny_components.unet)
    assert first == model_weights_hash(tiny_components.unet)
    changed = torch.nn.Linear(2, 2)
    assert model_weights_hash(changed) != model_weights_hash(torch.nn.Linear(2, 2))
    assert first != model_weights_hash(tiny_components.vae)


def test_model_hash_follows_the_configuration_not_where_it_came_from(tiny_components):
    """Models with the same weights but another setting that changes the computation (attention
    heads, upcasting, the VAE's scaling factor) got the same key, and each other's engines."""
    import copy

    unet = tiny_components.unet
    upcast = copy.deepcopy(unet)
    upcast.register_to_config(upcast_attention=not unet.config.upcast_attention)
    assert model_weights_hash(upcast) != model_weights_hash(unet)
    moved = copy.deepcopy(unet)
    moved.register_to_config(_name_or_path="/another/folder")
    assert model_weights_hash(moved) == model_weights_hash(unet)


def test_a_broken_manifest_is_refused_and_the_rebuild_replaces_it(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(KEY, b"engine bytes")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for broken in ("a string", {**manifest[KEY.filename], "key": ["a", "list"]}):
        (tmp_path / "manifest.json").write_text(json.dumps({KEY.filename: broken}))
        assert not cache.has(KEY)
        with pytest.raises(EngineCacheError, match="malformed.*rebuild with"):
            cache.load(KEY)
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(EngineCacheError, match="unreadable manifest.json.*rebuild with"):
        cache.load(KEY)
    cache.store(KEY, b"engine bytes")  # the rebuild the message asks for
    assert cache.load(KEY) == b"engine bytes"


def test_onnx_export_matches_torch(tiny_components, tmp_path):
    import onnxruntime as ort

    from pipeline.backends.onnx_export import (
        DecoderForExport, EncoderForExport, ExportShapes, UNetForExport, export_onnx,
    )

    shapes = ExportShapes(width=64, height=64, frames=1, unet_batch=2)
    paths = export_onnx(tiny_components, tmp_path, shapes)
    modules = {
        "unet": UNetForExport(tiny_components.unet),
        "vae_encoder": EncoderForExport(tiny_components.vae),
        "vae_decoder": DecoderForExport(tiny_components.vae),
    }
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "unet": (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999, 259]),
                 torch.randn(2, 77, 32, generator=generator)),
        "vae_encoder": (torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1,),
        "vae_decoder": (torch.randn(1, 4, 8, 8, generator=generator),),
    }
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs[name])}
        (ours,) = session.run(None, feed)
        with torch.no_grad():
            expected = modules[name](*inputs[name]).numpy()
        assert ours.shape == expected.shape
        assert np.abs(ours - expected).max() <= 1e-4, name


def test_unet_batches_cover_guidance_on_and_off():
    """The UNet batches engines are built for (build-engines) are the ones the stream calls with."""
    from pipeline import StreamConfig
    from pipeline.guidance import unet_batches

    def batches(cfg_type, frames=1, batched=True):
        return unet_batches(StreamConfig(device="cpu", cfg_type=cfg_type, t_index_list=(20, 40), frame_buffer_size=frames,
                                         use_denoising_batch=batched))

    assert batches("self") == (2,) and batches("none") == (2,)
    assert batches("full") == (2, 4) and batches("initialize") == (2, 3)
    assert batches("initialize", frames=2) == (4, 6)
    # sequential: one call per step of b frames, the negative rows with the first (initialize) or every (full)
    assert batches("full", batched=False) == (1, 2) and batches("initialize", batched=False) == (1, 2)


def test_build_engines_cli(tmp_path):
    from test_cli import sdbridge

    result = sdbridge("build-engines", "--model", "random:tiny", "--width", "64", "--height", "64", "--cfg", "full",
                      "--onnx-only", "--cache", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.parent.name for p in tmp_path.glob("onnx/*/unet.onnx")) == ["64x64-b2", "64x64-b4"]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = sdbridge("build-engines", "--model", "random:tiny", "--cache", str(tmp_path))
        assert result.returncode == 2 and "TensorRT is not installed" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model path not found: '/nonexistent/model'"),
    (["--model", "{tmp}/w.ckpt"], "w.ckpt"),
    (["--model", "random:tiny", "--t-index-list", "early,late"], "--t-index-list: 'early,late'"),
    (["--model", "random:tiny", "--cache", "{tmp}/w.ckpt"], "--cache"),
])
def test_build_engines_bad_input_is_one_line(tmp_path, args, message):
    from test_cli import sdbridge

    (tmp_path / "w.ckpt").write_bytes(b"not read")
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = sdbridge("-q", "build-engines", *args, "--onnx-only", "--width", "64", "--height", "64")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_tensorrt_build_where_tensorrt_imports(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it needs an NVIDIA GPU and its wheels)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but torch sees no CUDA GPU to build for")
    from pipeline import StreamConfig, random_components
    from pipeline.backends.tensorrt_build import build_engines

    config = StreamConfig(width=64, height=64, device="cuda", dtype="float16", t_index_list=(20, 40))
    components = random_components("tiny", device="cuda", dtype=torch.float16)
    cache = EngineCache(tmp_path / "engines")
    built = build_engines(components, config, cache, work_folder=tmp_path / "onnx")
    assert len(built) == 3 and all(path.exists() for path in built)
