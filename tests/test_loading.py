"""load_components on models the tests write themselves: a diffusers folder, a single-file
original-layout checkpoint, pickle payloads that must never run, hub ids that cannot be reached,
and an LCM-LoRA fused into the UNet. Real diffusers/transformers/peft/safetensors throughout."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import numpy as np
import torch

from ldm_checkpoint import ldm_state_dict, write_ldm_safetensors
from pipeline.errors import ModelLoadError, UnsafeWeightsError
from pipeline.loading import detect_arch, load_components
from pipeline.models import UNET_CONFIGS, write_clip_tokenizer
from pipeline.schedule import NoiseSchedule

CPU = torch.device("cpu")
TINY_KL_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
)
SCHEDULE = NoiseSchedule(beta_end=0.015, prediction_type="v_prediction")  # not the defaults: proves it is read


@pytest.fixture(scope="module")
def original(tiny_components):
    """The session's tiny random networks (read-only) plus a small AutoencoderKL of our own."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        kl_vae = AutoencoderKL(**TINY_KL_VAE).eval()
    return SimpleNamespace(
        unet=tiny_components.unet, text_encoder=tiny_components.text_encoder, taesd=tiny_components.vae, kl_vae=kl_vae
    )


def write_pipeline_folder(root: Path, original) -> Path:
    """The diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    original.unet.save_pretrained(root / "unet")
    original.text_encoder.save_pretrained(root / "text_encoder")
    original.kl_vae.save_pretrained(root / "vae")
    write_clip_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULE.to_scheduler_config()))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "LCMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return root


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, original) -> Path:
    return write_pipeline_folder(tmp_path_factory.mktemp("pipeline"), original)


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory, original) -> Path:
    folder = tmp_path_factory.mktemp("taesd")
    original.taesd.save_pretrained(folder)
    return folder


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)  # (B, 4, h, w)
    cond = torch.randn(2, 8, 32, generator=generator)  # (B, tokens, cross_attention_dim)
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 499]), encoder_hidden_states=cond).sample


def assert_same_weights(loaded: torch.nn.Module, expected: torch.nn.Module, dtype=torch.float32) -> None:
    loaded_state, expected_state = loaded.state_dict(), expected.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    different = [key for key in expected_state if not torch.equal(loaded_state[key], expected_state[key].to(dtype))]
    assert different == []


class Marker:
    """A pickle payload that creates a file when unpickled (harmless, but proves code ran)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_payload(path: Path, marker: Path) -> Path:
    with open(path, "wb") as file:
        pickle.dump({"state_dict": {"payload": Marker(marker)}}, file)
    return path


# ---------------------------------------------------------------------------------------------


def test_diffusers_folder_round_trip(model_folder, original, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.loading")
    components = load_components(str(model_folder), vae="model", dtype=torch.float32, device=CPU)

    assert_same_weights(components.unet, original.unet)
    assert_same_weights(components.text_encoder, original.text_encoder)
    assert_same_weights(components.vae, original.kl_vae)
    assert torch.equal(unet_output(components.unet), unet_output(original.unet))
    assert components.schedule == SCHEDULE
    assert (components.arch, components.source) == ("custom", str(model_folder))
    assert components.tokenizer("a cat").input_ids[0] == components.tokenizer.bos_token_id
    assert not components.unet.training and not next(components.unet.parameters()).requires_grad
    assert any("loading unet from" in record.getMessage() for record in caplog.records)


def test_separate_taesd_folder_and_dtype(model_folder, taesd_folder, original):
    from diffusers import AutoencoderTiny

    components = load_components(str(model_folder), vae=str(taesd_folder), dtype=torch.bfloat16, device=CPU)
    assert isinstance(components.vae, AutoencoderTiny)
    assert_same_weights(components.vae, original.taesd, dtype=torch.bfloat16)
    networks = (components.unet, components.vae, components.text_encoder)
    assert {parameter.dtype for network in networks for parameter in network.parameters()} == {torch.bfloat16}


def test_ldm_layout_keys(original):
    checkpoint = ldm_state_dict(unet=original.unet, vae=original.kl_vae, text_encoder=original.text_encoder)
    expected_count = sum(len(m.state_dict()) for m in (original.unet, original.kl_vae, original.text_encoder))
    assert len(checkpoint) == expected_count  # one LDM key per diffusers key, none merged
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.2.out_layers.3.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in checkpoint, key
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # 1x1 conv in ldm


def test_single_file_checkpoint(tmp_path, model_folder, original):
    path = write_ldm_safetensors(
        tmp_path / "tiny.safetensors", unet=original.unet, vae=original.kl_vae, text_encoder=original.text_encoder
    )
    components = load_components(
        str(path), single_file_config=str(model_folder), vae="model", dtype=torch.float32, device=CPU
    )
    assert torch.equal(unet_output(components.unet), unet_output(original.unet))
    assert_same_weights(components.unet, original.unet)
    assert_same_weights(components.text_encoder, original.text_encoder)
    assert_same_weights(components.vae, original.kl_vae)
    assert components.schedule == SCHEDULE
    assert components.source == str(path)


def test_ckpt_with_pickle_payload_is_refused_before_unpickling(tmp_path, model_folder):
    probe = write_payload(tmp_path / "probe.ckpt", tmp_path / "probe-ran")
    with open(probe, "rb") as file:
        pickle.load(file)  # the payload is live: unpickling it creates its marker
    assert (tmp_path / "probe-ran").exists()

    marker = tmp_path / "payload-ran"
    path = write_payload(tmp_path / "model.ckpt", marker)
    with pytest.raises(UnsafeWeightsError, match=r"model\.ckpt.*allow_pickle=True.*--allow-pickle"):
        load_components(str(path), single_file_config=str(model_folder), dtype=torch.float32, device=CPU)
    assert not marker.exists()


def test_folder_with_only_pickle_weights_is_refused(tmp_path, model_folder):
    folder = shutil.copytree(model_folder, tmp_path / "pickled")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    write_payload(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UnsafeWeightsError, match=r"diffusion_pytorch_model\.bin.*allow_pickle=True"):
        load_components(str(folder), vae="model", dtype=torch.float32, device=CPU)
    assert not marker.exists()


def test_pickle_lora_is_refused(tmp_path, model_folder):
    marker = tmp_path / "payload-ran"
    lora = write_payload(tmp_path / "lora.bin", marker)
    with pytest.raises(UnsafeWeightsError, match=r"lora\.bin"):
        load_components(str(model_folder), vae="model", lcm_lora=str(lora), dtype=torch.float32, device=CPU)
    assert not marker.exists()


@pytest.mark.parametrize("name,error,message", [
    ("model.SAFETENSORS", ModelLoadError, r"rename it to end in '\.safetensors', lower case"),
    ("model.safetensors", UnsafeWeightsError, r"is named \.safetensors but is not one"),
])
def test_a_pickle_named_like_safetensors_is_refused_before_unpickling(tmp_path, model_folder, name, error, message):
    """diffusers picks its loader by the exact file name: a pickle named .SAFETENSORS went to
    torch.load without allow_pickle. And a pickle renamed .safetensors is not one either."""
    marker = tmp_path / "payload-ran"
    path = write_payload(tmp_path / name, marker)
    with pytest.raises(error, match=message):
        load_components(str(path), single_file_config=str(model_folder), dtype=torch.float32, device=CPU)
    lora = write_payload(tmp_path / ("lora" + Path(name).suffix), marker)
    with pytest.raises(error, match=message):
        load_components(str(model_folder), vae="model", lcm_lora=str(lora), dtype=torch.float32, device=CPU)
    assert not marker.exists()


def test_a_single_file_config_folder_of_pickled_weights_is_refused(tmp_path, model_folder, original):
    """A checkpoint without a text encoder gets diffusers' from the config folder, pickle or not."""
    config = shutil.copytree(model_folder, tmp_path / "config")
    (config / "text_encoder" / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    write_payload(config / "text_encoder" / "pytorch_model.bin", marker)
    path = write_ldm_safetensors(tmp_path / "model.safetensors", unet=original.unet, vae=original.kl_vae,
                                 text_encoder=original.text_encoder)
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_components(str(path), single_file_config=str(config), dtype=torch.float32, device=CPU)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="expected a folder"):
        load_components(str(path), single_file_config=str(path), dtype=torch.float32, device=CPU)
    with pytest.raises(ModelLoadError, match="vae .*expected a folder"):
        load_components(str(model_folder), vae=str(path), dtype=torch.float32, device=CPU)


def test_ckpt_loads_with_allow_pickle(tmp_path, model_folder, original, caplog):
    checkpoint = ldm_state_dict(unet=original.unet, vae=original.kl_vae, text_encoder=original.text_encoder)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": checkpoint}, path)
    components = load_components(
        str(path), allow_pickle=True, single_file_config=str(model_folder), vae="model",
        dtype=torch.float32, device=CPU,
    )
    assert torch.equal(unet_output(components.unet), unet_output(original.unet))
    assert any(r.levelno == logging.WARNING and "allow_pickle" in r.getMessage() for r in caplog.records)


def test_missing_path(tmp_path):
    missing = tmp_path / "models" / "nothing.safetensors"
    with pytest.raises(ModelLoadError, match="model path not found: .*nothing.safetensors"):
        load_components(str(missing), dtype=torch.float32, device=CPU)


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        load_components("sdbridge-tests/no-such-model", dtype=torch.float32, device=CPU)
    message = str(caught.value)
    assert message.startswith(
        "model 'sdbridge-tests/no-such-model' is not a local folder or file, and the hub could not be reached: "
    )
    assert message.endswith("pass a local folder or a .safetensors file")
    assert "\n" not in message


def test_default_taesd_offline_says_what_to_pass(monkeypatch, model_folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"madebyollin/taesd.*vae=<local folder.*vae='model'"):
        load_components(str(model_folder), dtype=torch.float32, device=CPU)


# ---------------------------------------------------------------------------------------------
# LCM-LoRA


def write_lora(folder: Path, *, unet_config: dict, rank: int = 4, alpha: int = 8, seed: int = 5):
    """A random LoRA on to_q/to_k/to_v/to_out.0 made with peft, saved in diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        unet.add_adapter(config)
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a LoRA that changes nothing proves nothing
                torch.nn.init.normal_(parameter, std=0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    return folder / "pytorch_lora_weights.safetensors", unet


def test_lcm_lora_is_fused(tmp_path, model_folder, original):
    lora_file, lora_unet = write_lora(tmp_path, unet_config=UNET_CONFIGS["tiny"], rank=4, alpha=8)
    components = load_components(
        str(model_folder), vae="model", lcm_lora=str(lora_file), dtype=torch.float32, device=CPU
    )

    def to_q(unet):
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q

    lora_layer = to_q(lora_unet)
    a, b = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight  # (r, in), (out, r)
    expected = to_q(original.unet).weight + (8 / 4) * b @ a
    merged = to_q(components.unet)
    assert type(merged) is torch.nn.Linear  # plain weights after fuse + unload
    torch.testing.assert_close(merged.weight, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(unet_output(components.unet), unet_output(original.unet))


def test_style_loras_are_fused_after_the_lcm_lora_each_at_its_scale(tmp_path, model_folder, original):
    """StreamDiffusion's lora_dict: W = W0 + 1.0 * dW_lcm + 0.5 * dW_a - 0.25 * dW_b, plain weights after."""
    files, unets = [], []
    for index, (rank, alpha) in enumerate([(4, 8), (2, 2), (4, 4)]):
        folder = tmp_path / f"lora{index}"
        folder.mkdir()
        lora_file, lora_unet = write_lora(folder, unet_config=UNET_CONFIGS["tiny"], rank=rank, alpha=alpha,
                                          seed=100 + index)
        files.append(lora_file)
        unets.append((lora_unet, alpha / rank))
    components = load_components(str(model_folder), vae="model", lcm_lora=str(files[0]),
                                 loras=[(str(files[1]), 0.5), (str(files[2]), -0.25)], dtype=torch.float32, device=CPU)

    def to_q(unet):
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q

    expected = to_q(original.unet).weight.clone()
    for (lora_unet, scaling), scale in zip(unets, (1.0, 0.5, -0.25)):
        layer = to_q(lora_unet)
        expected += scale * scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    merged = to_q(components.unet)
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged.weight, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loras, message", [
    ([("x.safetensors", float("nan"))], "scale nan must be a number in -10..10"),
    ([("x.safetensors", 11)], "scale 11 must be"),
    ([("", 1.0)], "must be a non-empty path"),
    ("x.safetensors", "must be a list of"),
    ([("x.safetensors",)], "must be a .weights, scale. pair"),
])
def test_bad_lora_arguments_are_one_clear_error(model_folder, loras, message):
    with pytest.raises(ValueError, match=message):
        load_components(str(model_folder), vae="model", loras=loras, dtype=torch.float32, device=CPU)


def test_a_style_lora_that_is_missing_or_does_not_fit_is_named(tmp_path, model_folder):
    with pytest.raises(ModelLoadError, match="lora path not found: .*nope.safetensors"):
        load_components(str(model_folder), vae="model", loras=[(str(tmp_path / "nope.safetensors"), 1.0)],
                        dtype=torch.float32, device=CPU)
    wrong, _ = write_lora(tmp_path, unet_config=dict(UNET_CONFIGS["tiny"], cross_attention_dim=48))
    with pytest.raises(ModelLoadError, match="^lora .* does not fit the UNet of .*size mismatch"):
        load_components(str(model_folder), vae="model", loras=[(str(wrong), 0.8)], dtype=torch.float32, device=CPU)


@pytest.mark.parametrize(
    "other_unet, symptom",
    [({"cross_attention_dim": 48}, "size mismatch"), ({"layers_per_block": 2}, "unexpected keys")],
    ids=["shapes", "layers"],
)
def test_lcm_lora_that_does_not_fit(tmp_path, model_folder, other_unet, symptom):
    wrong, _ = write_lora(tmp_path, unet_config=dict(UNET_CONFIGS["tiny"], **other_unet))
    with pytest.raises(ModelLoadError, match=f"lcm_lora .* does not fit the UNet of .*{symptom}"):
        load_components(str(model_folder), vae="model", lcm_lora=str(wrong.parent), dtype=torch.float32, device=CPU)


def test_bad_arguments_name_the_parameter(model_folder):
    with pytest.raises(ValueError, match="dtype: torch.int8"):
        load_components(str(model_folder), vae="model", dtype=torch.int8, device=CPU)
    with pytest.raises(ValueError, match="vae: ''"):
        load_components(str(model_folder), vae="", dtype=torch.float32, device=CPU)


@pytest.mark.parametrize("arch", ["tiny", "sd15", "sd-turbo"])
def test_random_networks_are_made_on_the_device_asked_for(arch):
    """random_components makes a CUDA model's UNet and text encoder on the GPU (initialised there,
    not on the CPU and copied: seconds instead of minutes of device time); the meta device stands
    in for CUDA here: every parameter and buffer is created on the device asked for."""
    from pipeline.models import _random_networks

    unet, text_encoder = _random_networks(arch, torch.device("meta"))
    tensors = [*unet.parameters(), *unet.buffers(), *text_encoder.parameters(), *text_encoder.buffers()]
    assert len(tensors) > 100 and {tensor.device.type for tensor in tensors} == {"meta"}
    assert detect_arch(unet.config) == ("custom" if arch == "tiny" else arch)
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size


def test_detect_arch():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real SD 2.1 / SD-Turbo UNet, without allocating its weights
        sd_turbo = UNet2DConditionModel(**UNET_CONFIGS["sd-turbo"])
    assert detect_arch(sd_turbo.config) == "sd-turbo"
    assert detect_arch(UNET_CONFIGS["sd15"]) == "sd15"
    assert detect_arch(dict(UNET_CONFIGS["sd-turbo"], attention_head_dim=[5, 10, 20, 20])) == "sd-turbo"
    assert detect_arch(UNET_CONFIGS["tiny"]) == "custom"
    assert detect_arch(dict(UNET_CONFIGS["sd15"], cross_attention_dim=1024)) == "custom"


def test_stream_from_pretrained_folder_runs_frames(model_folder, original):
    from pipeline import StreamConfig, StreamDiffusion

    config = StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 40))
    engine = StreamDiffusion.from_pretrained(str(model_folder), config, vae="model")
    engine.set_prompt("a boat")
    out = engine(np.zeros((64, 64, 3), np.uint8))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert engine.components.source == str(model_folder)


def test_run_loads_a_single_file_checkpoint_offline_with_single_file_config(tmp_path, model_folder, original, capsys):
    """`sdbridge run --single-file-config FOLDER`: the configs come from the folder, not the hub
    (which this machine cannot reach: without the flag the same run stops with the loader's line)."""
    from bridge import cli

    path = write_ldm_safetensors(
        tmp_path / "tiny.safetensors", unet=original.unet, vae=original.kl_vae, text_encoder=original.text_encoder
    )
    run = ["-q", "run", "--model", str(path), "--vae", "model", "--sink", "null", "--device", "cpu", "--width", "64",
           "--height", "64", "--frames", "2", "--no-osc", "--no-status"]
    assert cli.main(run + ["--single-file-config", str(model_folder)]) == 0, capsys.readouterr().err
    assert cli.main(run) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and diffusers' progress)
    assert len(error) == 1 and "tiny.safetensors" in error[0] and "--single-file-config" in error[0], error
