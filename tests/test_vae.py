"""Tests for models.vae and models.vae_weights: parity with diffusers' AutoencoderKL through
goldens it produced (benchmarks/vae_parity_golden.py), the converter's refusals, the legacy
attention names, loading a diffusers folder and its errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shortcut_jax.models import vae_weights
from shortcut_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    VAEConfigError,
    sample_posterior,
    scale_latents,
    unscale_latents,
)
from shortcut_jax.models.vae_weights import WeightsError

GOLDEN = os.path.join(os.path.dirname(__file__), "goldens", "vae_sd_ft_mse_64.npz")
TOLERANCE = 1e-5  # relative (Frobenius norm) error, float32 on CPU


def relative_error(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def golden_state_dict(golden):
    """The diffusers state dict the golden was made with, rebuilt from its names, shapes and seed."""
    dims = iter(golden["shape_dims"].tolist())
    names_and_shapes = [
        (name, tuple(next(dims) for _ in range(ndim)))
        for name, ndim in zip(golden["names"].tolist(), golden["shape_ndims"].tolist())
    ]
    return vae_weights.seeded_state_dict(names_and_shapes, int(golden["seed"]))


@pytest.fixture(scope="module")
def full_vae():
    """The sd-vae-ft-mse network with the golden's weights, and its golden outputs."""
    golden = dict(np.load(GOLDEN))
    config = VAEConfig.from_diffusers(json.loads(str(golden["config_json"])))
    params = vae_weights.convert_state_dict(golden_state_dict(golden), config)
    return config, params, golden


@pytest.fixture(scope="module")
def tiny():
    config = VAEConfig.tiny()
    names = sorted(vae_weights.expected_state_dict(config).items())
    return config, vae_weights.seeded_state_dict(names, seed=3)


def test_golden_comes_from_the_full_sd_vae_config(full_vae):
    config, _, golden = full_vae
    assert config == VAEConfig.sd_vae_ft_mse()
    assert config.block_out_channels == (128, 256, 512, 512) and config.norm_num_groups == 32
    assert len(golden["names"]) == len(vae_weights.expected_state_dict(config))


def test_encoder_matches_diffusers_golden(full_vae):
    config, params, golden = full_vae
    model = AutoencoderKL(config)
    mean, std = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(
        params, golden["images"]
    )
    assert mean.shape == golden["mean"].shape == (2, 8, 8, 4)
    assert relative_error(mean, golden["mean"]) <= TOLERANCE
    assert relative_error(std, golden["std"]) <= TOLERANCE


def test_decoder_matches_diffusers_golden(full_vae):
    config, params, golden = full_vae
    model = AutoencoderKL(config)
    images = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, golden["latents"])
    assert images.shape == golden["decoded"].shape == (2, 64, 64, 3)
    assert relative_error(images, golden["decoded"]) <= TOLERANCE


def test_converter_refuses_a_missing_key_by_name(tiny):
    config, state_dict = tiny
    state_dict = dict(state_dict)
    state_dict.pop("decoder.up_blocks.0.resnets.1.norm2.weight")
    with pytest.raises(WeightsError, match=r"1 missing .*decoder\.up_blocks\.0\.resnets\.1\.norm2\.weight"):
        vae_weights.convert_state_dict(state_dict, config)


def test_converter_refuses_an_unexpected_key_by_name(tiny):
    config, state_dict = tiny
    state_dict = {**state_dict, "encoder.mid_block.attentions.0.rel_pos_bias": np.zeros(3, np.float32)}
    with pytest.raises(WeightsError, match=r"1 unexpected .*encoder\.mid_block\.attentions\.0\.rel_pos_bias"):
        vae_weights.convert_state_dict(state_dict, config)


def test_converter_refuses_a_wrong_shape_by_name(tiny):
    config, state_dict = tiny
    state_dict = {**state_dict, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(WeightsError, match=r"quant_conv\.weight: \(8, 8, 3, 3\), expected \(8, 8, 1, 1\)"):
        vae_weights.convert_state_dict(state_dict, config)


def test_converter_uses_every_key_once_and_transposes(tiny):
    config, state_dict = tiny
    params = vae_weights.convert_state_dict(state_dict, config)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) == len(state_dict)
    conv = state_dict["encoder.conv_in.weight"]  # torch [out, in, kh, kw]
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"], conv.transpose(2, 3, 1, 0))
    dense = state_dict["decoder.mid_block.attentions.0.to_out.0.weight"]  # torch [out, in]
    np.testing.assert_array_equal(params["decoder"]["mid_block"]["attentions_0"]["to_out"]["kernel"], dense.T)


def test_legacy_attention_names_give_the_same_params(tiny):
    config, state_dict = tiny
    legacy = {}
    for name, value in state_dict.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                if value.ndim == 2 and old == "query":
                    value = value[:, :, None, None]  # the oldest files store q as a 1x1 convolution
        legacy[name] = value
    assert any(".proj_attn." in name for name in legacy)
    want = vae_weights.convert_state_dict(state_dict, config)
    got = vae_weights.convert_state_dict(legacy, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_load_vae_from_a_diffusers_folder(tmp_path, tiny):
    config, state_dict = tiny
    folder = str(tmp_path / "tiny-vae")
    vae_weights.write_diffusers_folder(folder, config, state_dict)
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = vae_weights.load_vae(folder)
    assert loaded.config == config and loaded.name == "tiny-vae"
    assert loaded.weights_sha256 == vae_weights.file_sha256(os.path.join(folder, vae_weights.SAFETENSORS_FILE))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, loaded.params, vae_weights.convert_state_dict(state_dict, config)
    )
    # a pipeline folder holds the VAE in vae/
    pipeline = tmp_path / "pipeline"
    os.makedirs(pipeline)
    os.rename(folder, pipeline / "vae")
    assert vae_weights.load_vae(str(pipeline)).weights_sha256 == loaded.weights_sha256


def test_missing_weights_name_the_folder_and_the_download_command(tmp_path, tiny):
    config, _ = tiny
    folder = tmp_path / "sd-vae"
    os.makedirs(folder)
    with open(folder / "config.json", "w") as f:
        json.dump(config.to_diffusers(), f)
    with pytest.raises(WeightsError) as error:
        vae_weights.load_vae(str(folder))
    message = str(error.value)
    assert str(folder) in message
    assert f"huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir {folder}" in message


def test_missing_config_names_the_folder(tmp_path):
    with pytest.raises(WeightsError, match=f"no config.json in {tmp_path}.*huggingface-cli download"):
        vae_weights.load_vae(str(tmp_path))


def test_truncated_weights_file_is_named(tmp_path, tiny):
    config, state_dict = tiny
    folder = str(tmp_path / "vae")
    vae_weights.write_diffusers_folder(folder, config, state_dict)
    path = os.path.join(folder, vae_weights.SAFETENSORS_FILE)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(WeightsError, match=f"cannot read {path}.*huggingface-cli download"):
        vae_weights.load_vae(folder)


def test_weights_of_another_config_name_the_mismatch(tmp_path, tiny):
    config, state_dict = tiny
    folder = str(tmp_path / "vae")
    three_blocks = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
    vae_weights.write_diffusers_folder(folder, three_blocks, state_dict)  # weights of the two-block VAE
    with pytest.raises(WeightsError) as error:
        vae_weights.load_vae(folder)
    message = str(error.value)
    assert "missing" in message and "decoder.up_blocks.2.resnets.0.conv1.weight" in message
    assert "decoder.up_blocks.1.resnets.0.conv1.weight: (16, 32, 3, 3), expected (32, 32, 3, 3)" in message


def test_bin_weights_load_through_torch(tmp_path, tiny):
    import torch

    config, state_dict = tiny
    folder = tmp_path / "vae"
    os.makedirs(folder)
    with open(folder / "config.json", "w") as f:
        json.dump(config.to_diffusers(), f)
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, folder / vae_weights.BIN_FILE)
    loaded = vae_weights.load_vae(str(folder))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, loaded.params, vae_weights.convert_state_dict(state_dict, config)
    )


def test_config_round_trips_through_diffusers_format():
    for config in (VAEConfig.sd_vae_ft_mse(), VAEConfig.tiny()):
        assert VAEConfig.from_diffusers(json.loads(json.dumps(config.to_diffusers()))) == config
    legacy = {k: v for k, v in VAEConfig.sd_vae_ft_mse().to_diffusers().items() if k != "scaling_factor"}
    assert VAEConfig.from_diffusers(legacy).scaling_factor == 0.18215  # sd-vae-ft-mse's file has no such key


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("act_fn", "gelu", "act_fn"),
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], "down_block_types"),
        ("latents_mean", [0.0] * 4, "latents_mean"),
        ("use_quantisation", True, "use_quantisation"),
    ],
)
def test_unsupported_config_is_refused_by_key(key, value, named):
    config = {**VAEConfig.tiny().to_diffusers(), key: value}
    with pytest.raises(VAEConfigError, match=named):
        VAEConfig.from_diffusers(config)


def test_bfloat16_compute_stays_close_to_float32(tiny):
    config, state_dict = tiny
    params = vae_weights.convert_state_dict(state_dict, config)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = AutoencoderKL(config, dtype=dtype)

        @jax.jit
        def encode_decode(params, images):
            mean, std = model.apply({"params": params}, images, method=AutoencoderKL.encode)
            return mean, std, model.apply({"params": params}, mean, method=AutoencoderKL.decode)

        outputs[dtype] = encode_decode(params, images)
        assert outputs[dtype][0].dtype == outputs[dtype][2].dtype == jnp.float32
        assert outputs[dtype][0].shape == (2, 8, 8, 4) and outputs[dtype][2].shape == (2, 16, 16, 3)
    for got, want in zip(outputs[jnp.bfloat16], outputs[jnp.float32]):
        assert 0 < relative_error(got, np.asarray(want)) < 0.05


def test_posterior_samples_have_the_posterior_mean_and_std():
    mean = jnp.linspace(-2, 2, 64).reshape(1, 4, 4, 4)
    std = jnp.linspace(0.1, 3, 64).reshape(1, 4, 4, 4)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: sample_posterior(k, mean, std))(keys)
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * 3 / np.sqrt(4000))
    np.testing.assert_allclose(draws.std(0) / std, 1.0, atol=0.08)


def test_scale_and_unscale_are_inverse():
    config = VAEConfig(shift_factor=0.1, scaling_factor=0.3)
    z = np.linspace(-3, 3, 7, dtype=np.float32)
    np.testing.assert_allclose(scale_latents(z, config), (z - 0.1) * 0.3, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(scale_latents(z, config), config), z, rtol=1e-6)


def test_latent_decoder_unscales_batches_and_clips(tmp_path, tiny):
    config, state_dict = tiny
    folder = str(tmp_path / "vae")
    vae_weights.write_diffusers_folder(folder, config, state_dict)
    vae = vae_weights.load_vae(folder)
    scaled = np.random.default_rng(0).standard_normal((5, 4, 4, 4)).astype(np.float32)  # two batches of 3
    images = vae.latent_decoder(dtype=jnp.float32, batch_size=3)(scaled)
    model = AutoencoderKL(config)
    want = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(
        vae.params, unscale_latents(scaled, config)
    )
    assert images.shape == (5, 8, 8, 3)
    np.testing.assert_allclose(images, np.clip(want, -1, 1), rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1  # the clip did something
