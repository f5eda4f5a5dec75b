"""Tests for shortcut_jax.evaluation.inception: parity with pytorch-fid, weights and conversion.

The golden file was written by pytorch-fid's own network (benchmarks/fid_inception_golden.py)
with weights from ``synthetic_torch_state_dict``; here the same weights are rebuilt from the
stored names, shapes and seed, without torch.
"""

import hashlib
import os

import jax
import numpy as np
import pytest

from shortcut_jax.evaluation import inception as inc

GOLDEN = os.path.join(os.path.dirname(__file__), "goldens", "fid_inception_golden.npz")


def _golden():
    with np.load(GOLDEN) as f:
        names = [str(n) for n in f["names"]]
        shapes = [tuple(int(d) for d in s[:n]) for s, n in zip(f["shapes"], f["ndim"])]
        images = [f[f"image_{i}"] for i in range(int(f["num_images"]))]
        return list(zip(names, shapes)), int(f["seed"]), images, f["features"]


@pytest.fixture(scope="module")
def golden():
    names_and_shapes, seed, images, features = _golden()
    state_dict = inc.synthetic_torch_state_dict(names_and_shapes, seed)
    return {
        "names_and_shapes": names_and_shapes,
        "seed": seed,
        "images": images,
        "features": features,
        "state_dict": state_dict,
    }


@pytest.fixture(scope="module")
def extractor(golden):
    # One device and a chunk of two: one compilation of the network serves every test.
    variables = inc.torch_state_dict_to_variables(golden["state_dict"])
    return inc.InceptionFeatures(variables, batch_size=2, devices=jax.local_devices()[:1])


def test_features_match_pytorch_fid_golden_to_relative_1e_4(extractor, golden):
    sizes = [im.shape[:2] for im in golden["images"]]
    # The golden exercises no resize, enlarging, and shrinking along one axis.
    assert (299, 299) in sizes and any(h < 299 for h, _ in sizes) and any(w > 299 for _, w in sizes)
    for image, ref in zip(golden["images"], golden["features"]):
        got = extractor(image[None])[0]
        assert got.dtype == np.float32 and got.shape == (inc.FEATURE_DIM,)
        # Features of order one, so the relative bound is a real bound.
        assert np.abs(ref).max() > 0.5
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, (image.shape, rel)


def test_float_images_in_chunks_give_the_features_of_their_uint8_bytes(extractor, golden):
    image = golden["images"][2]  # 32x32, the cheapest
    rng = np.random.default_rng(0)
    batch = np.stack([image, image[::-1], 255 - image])  # 3 images: one full chunk, one padded
    floats = batch.astype(np.float32) / 127.5 - 1.0 + rng.uniform(-0.003, 0.003, batch.shape)
    one_by_one = np.concatenate([extractor(x[None]) for x in batch])
    np.testing.assert_array_equal(extractor(floats.astype(np.float32)), one_by_one)
    assert np.abs(one_by_one[0] - one_by_one[1]).max() > 1e-3  # different images, different rows
    ref = golden["features"][2]
    assert np.abs(one_by_one[0] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_images_of_wrong_layout_are_refused(extractor):
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        extractor(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="non-finite"):
        extractor(np.full((1, 8, 8, 3), np.nan, np.float32))


def test_bilinear_resize_equals_torch_interpolate():
    import torch

    rng = np.random.default_rng(1)
    for h, w in [(32, 32), (256, 256), (96, 480), (600, 150), (1, 7), (299, 299)]:
        x = rng.uniform(0, 1, (2, h, w, 3)).astype(np.float32)
        ref = (
            torch.nn.functional.interpolate(
                torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
        got = np.asarray(inc.bilinear_resize(x))
        np.testing.assert_allclose(got, ref, rtol=0, atol=3e-7, err_msg=str((h, w)))


def test_network_layout_is_the_reference_state_dict_layout(golden):
    """Every tensor of pytorch-fid's state dict has a place of the same shape in the network,
    except BatchNorm's counters and the classifier, which the features do not use."""
    reference = dict(golden["names_and_shapes"])
    optional = {k for k in reference if k.endswith("num_batches_tracked") or k.startswith("fc.")}
    assert {"fc.weight", "fc.bias"} <= optional
    expected = inc.expected_torch_shapes()
    assert set(expected) == set(reference) - optional
    assert all(expected[k] == reference[k] for k in expected)


def test_converter_refuses_missing_and_unexpected_keys_by_name(golden):
    state = dict(golden["state_dict"])
    missing = dict(state)
    del missing["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    with pytest.raises(ValueError, match=r"missing 1 keys: Mixed_6c\.branch7x7dbl_4\.bn\.running_var"):
        inc.torch_state_dict_to_variables(missing)
    extra = dict(state, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected 1 keys: AuxLogits\.conv0\.conv\.weight"):
        inc.torch_state_dict_to_variables(extra)
    wrong = dict(state, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3\.conv\.weight has shape \(32, 3, 5, 5\)"):
        inc.torch_state_dict_to_variables(wrong)
    # Files without BatchNorm counters and classifier (older torch, or stripped) still load.
    lean = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") or k.startswith("fc."))}
    variables = inc.torch_state_dict_to_variables(lean)
    kernel = variables["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, state["Mixed_5b.branch5x5_2.conv.weight"].transpose(2, 3, 1, 0))


def test_weights_missing_error_names_file_place_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR, raising=False)
    with pytest.raises(inc.WeightsNotFoundError) as err:
        inc.find_weights()
    message = str(err.value)
    assert inc.WEIGHTS_FILE in message and inc.WEIGHTS_URL in message
    assert os.path.join(str(tmp_path), ".cache", "shortcut_jax", inc.CONVERTED_FILE) in message
    assert inc.WEIGHTS_ENV_VAR in message and "fid_weights" in message and "--convert" in message
    with pytest.raises(inc.WeightsNotFoundError, match="not found at .*nowhere.npz"):
        inc.InceptionFeatures(weights_path=str(tmp_path / "nowhere.npz"))
    monkeypatch.setenv(inc.WEIGHTS_ENV_VAR, str(tmp_path / "gone.pth"))
    with pytest.raises(inc.WeightsNotFoundError, match="gone.pth"):
        inc.find_weights()
    # The default place is searched: a converted file there is found without any setting.
    monkeypatch.delenv(inc.WEIGHTS_ENV_VAR)
    target = tmp_path / ".cache" / "shortcut_jax" / inc.CONVERTED_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert inc.find_weights() == str(target)


def test_converted_npz_and_pth_load_to_the_same_variables(golden, tmp_path, monkeypatch):
    import torch

    pth = tmp_path / "weights.pth"
    torch.save({k: torch.from_numpy(v) for k, v in golden["state_dict"].items()}, pth)
    sha = hashlib.sha256(pth.read_bytes()).hexdigest()
    # Other weights than the released file are refused, naming the hash and the source.
    with pytest.raises(ValueError, match=f"{sha[:16]}.*{inc.WEIGHTS_URL}"):
        inc.load_variables(str(pth))
    # Accepting this file as the release shows the whole conversion path end to end.
    monkeypatch.setattr(inc, "WEIGHTS_SHA256_PREFIX", sha[:8])
    npz = tmp_path / "converted.npz"
    assert inc.main(["--convert", str(pth), "--out", str(npz)]) == 0
    from_pth, info_pth = inc.load_variables(str(pth))
    from_npz, info_npz = inc.load_variables(str(npz))
    assert info_npz["source_sha256"] == sha == info_pth["source_sha256"]
    assert info_npz["fingerprint"] == info_pth["fingerprint"]
    direct = inc.torch_state_dict_to_variables(golden["state_dict"])
    assert inc.variables_fingerprint(direct) == info_npz["fingerprint"]
    flat_a = jax.tree_util.tree_leaves(from_npz)
    flat_b = jax.tree_util.tree_leaves(direct)
    assert all(np.array_equal(a, b) for a, b in zip(flat_a, flat_b))


def test_converted_npz_missing_a_tensor_is_refused_by_name(golden, tmp_path):
    variables = inc.torch_state_dict_to_variables(golden["state_dict"])
    del variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"]
    path = tmp_path / "broken.npz"
    inc.save_variables(variables, str(path))
    with pytest.raises(ValueError, match="batch_stats/Mixed_7c/branch_pool/bn/var"):
        inc.load_variables(str(path))
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a converted FID Inception file"):
        inc.load_variables(str(tmp_path / "plain.npz"))


def test_synthetic_weights_depend_on_name_and_seed_not_order(golden):
    names_and_shapes = golden["names_and_shapes"][:6]
    a = inc.synthetic_torch_state_dict(names_and_shapes, 3)
    b = inc.synthetic_torch_state_dict(names_and_shapes[::-1], 3)
    c = inc.synthetic_torch_state_dict(names_and_shapes, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    name = names_and_shapes[0][0]
    assert not np.array_equal(a[name], c[name])
