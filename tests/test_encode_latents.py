"""Tests for shortcut_jax.encode (images -> sharded posterior moments) and data.latents (the
reader): a tiny image folder encoded with a tiny random-weights VAE saved as a diffusers folder,
resume after an interrupted encode, the reader's stream (posterior samples, flips, resume,
process slices) and the errors of both."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import child_env
from shortcut_jax import encode
from shortcut_jax.data import default_data_config, make_dataset, validate_data_config
from shortcut_jax.data import latents as latent_format
from shortcut_jax.data.core import ExampleOrder, uint8_to_float
from shortcut_jax.data.image_folder import load_image
from shortcut_jax.data.image_source import IMAGE_SOURCES, ReaderImages, open_image_folder
from shortcut_jax.models import vae_weights
from shortcut_jax.models.vae import AutoencoderKL, VAEConfig

IMAGE_SIZE = 16
SHARD_SIZE = 4
BATCH = 8  # a multiple of the 8 simulated devices
# (height, width) per file: non-square, larger and (one) smaller than IMAGE_SIZE
SIZES = {
    "cat": [(20, 18), (16, 16), (24, 30), (19, 17), (12, 12)],
    "dog": [(18, 20), (17, 25), (40, 20), (16, 21), (22, 16), (30, 30)],
}
NUM_IMAGES = sum(len(v) for v in SIZES.values())  # 11: shards of 4, 4 and 3


def write_images(root):
    rng = np.random.default_rng(0)
    for label, sizes in SIZES.items():
        os.makedirs(os.path.join(root, label))
        for i, (h, w) in enumerate(sizes):
            # smooth images, so that mirroring changes the latent noticeably
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
            image.save(os.path.join(root, label, f"{i:02d}.png"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A class folder of PNGs, a tiny VAE as a diffusers folder, and the folder encoded once."""
    root = tmp_path_factory.mktemp("latents")
    images = str(root / "images")
    write_images(images)
    vae_folder = str(root / "tiny-vae")
    config = VAEConfig.tiny()
    vae_weights.write_diffusers_folder(
        vae_folder, config, vae_weights.seeded_state_dict(sorted(vae_weights.expected_state_dict(config).items()), 1)
    )
    vae = vae_weights.load_vae(vae_folder)
    out = str(root / "encoded")
    source = open_image_folder(images, IMAGE_SIZE, 2)
    manifest = encode.encode_images(source, out, vae, settings(), progress=False)
    source.close()
    return {"root": root, "images": images, "vae_folder": vae_folder, "vae": vae, "out": out, "manifest": manifest}


def settings(**overrides):
    return encode.EncodeSettings(
        **{"image_size": IMAGE_SIZE, "batch_size": BATCH, "shard_size": SHARD_SIZE, **overrides}
    )


def shard_bytes(folder):
    names = sorted(n for n in os.listdir(folder) if n.startswith("shard_"))
    result = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            result[name] = f.read()
    return result


def stored_moments(out):
    manifest = latent_format.read_manifest(out)
    return np.concatenate([np.load(latent_format.shard_paths(out, s["index"])[0]) for s in manifest["shards"]])


def latent_config(out, **overrides):
    config = default_data_config()
    config.name, config.path = "latents", out
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def files_in_order(images):
    return [os.path.join(images, label, f"{i:02d}.png") for label, sizes in SIZES.items() for i in range(len(sizes))]


# --- encoding ----------------------------------------------------------------------------------


def test_encoded_moments_are_the_vae_posterior_of_each_image_and_its_mirror(workspace):
    vae = workspace["vae"]
    pixels = np.stack([load_image(p, IMAGE_SIZE) for p in files_in_order(workspace["images"])])
    model = AutoencoderKL(vae.config)
    encode_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    want = {flip: encode_fn(vae.params, uint8_to_float(pixels[:, :, ::-1] if flip else pixels)) for flip in (0, 1)}
    moments = stored_moments(workspace["out"])
    assert moments.shape == (NUM_IMAGES, 2, 2, 8, 8, 4) and moments.dtype == np.float32
    for flip in (0, 1):
        for which in (0, 1):  # mean, std
            np.testing.assert_allclose(moments[:, flip, which], want[flip][which], rtol=2e-5, atol=2e-6)
    # the mirror's latent is not the mirrored latent
    assert not np.allclose(moments[:, 1, 0], moments[:, 0, 0, :, ::-1], atol=1e-2)
    labels = np.concatenate([np.load(latent_format.shard_paths(workspace["out"], s)[1]) for s in range(3)])
    np.testing.assert_array_equal(labels, [0] * 5 + [1] * 6)


def test_manifest_records_source_vae_scale_and_count(workspace):
    manifest = latent_format.read_manifest(workspace["out"])
    assert manifest["complete"] and manifest["count"] == NUM_IMAGES and manifest["num_shards"] == 3
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    assert manifest["image_size"] == IMAGE_SIZE and manifest["latent_shape"] == [8, 8, 4]
    assert manifest["scaling_factor"] == 0.18215 and manifest["dtype"] == "float32"
    assert manifest["vae"]["name"] == "tiny-vae"
    assert manifest["vae"]["weights_sha256"] == vae_weights.file_sha256(
        os.path.join(workspace["vae_folder"], vae_weights.SAFETENSORS_FILE)
    )
    source = manifest["source"]
    assert source["type"] == "image_folder" and source["class_names"] == ["cat", "dog"]
    assert source["num_upscaled"] == 1 and "centred square" in source["crop"]


def test_encode_stopped_midway_and_resumed_gives_identical_shards(workspace):
    out = str(workspace["root"] / "interrupted")
    source = open_image_folder(workspace["images"], IMAGE_SIZE, 2)
    try:
        partial = encode.encode_images(source, out, workspace["vae"], settings(), max_shards=1, progress=False)
        assert not partial["complete"]
        assert sorted(shard_bytes(out)) == ["shard_00000.labels.npy", "shard_00000.moments.npy"]
        first_written = os.stat(os.path.join(out, "shard_00000.moments.npy")).st_mtime_ns
        # a run killed while writing shard 1 leaves its temporary file behind
        with open(os.path.join(out, "shard_00001.moments.npy.tmp"), "wb") as f:
            f.write(b"\x93NUMPY half a shard")
        with pytest.raises(latent_format.LatentSetError, match="incomplete"):
            make_dataset(latent_config(out), batch_size=2, seed=0)
        manifest = encode.encode_images(source, out, workspace["vae"], settings(), progress=False)
    finally:
        source.close()
    assert manifest["complete"]
    assert os.stat(os.path.join(out, "shard_00000.moments.npy")).st_mtime_ns == first_written  # not redone
    assert shard_bytes(out) == shard_bytes(workspace["out"])
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_any_reader_through_its_source_interface_gives_the_same_shards(workspace):
    config = default_data_config()
    config.name, config.path, config.num_workers = "image_folder", workspace["images"], 2
    source = ReaderImages(config, IMAGE_SIZE)  # the image-folder reader, used only as a Source
    out = str(workspace["root"] / "through_reader")
    try:
        assert (source.num_examples, source.num_classes) == (NUM_IMAGES, 2)
        manifest = encode.encode_images(source, out, workspace["vae"], settings(), progress=False)
    finally:
        source.close()
    assert manifest["complete"] and manifest["source"]["type"] == "image_folder"
    assert shard_bytes(out) == shard_bytes(workspace["out"])


def test_command_line_finishes_an_interrupted_encode(workspace):
    out = str(workspace["root"] / "cli")
    shutil.copytree(workspace["out"], out)
    os.remove(os.path.join(out, "shard_00002.moments.npy"))
    with open(os.path.join(out, "shard_00001.labels.npy"), "r+b") as f:  # cut short by a kill
        f.truncate(20)
    command = [
        sys.executable,
        "-m",
        "shortcut_jax.encode",
        f"--source={workspace['images']}",
        f"--out={out}",
        f"--vae={workspace['vae_folder']}",
        f"--image_size={IMAGE_SIZE}",
        f"--batch_size={BATCH}",
        f"--shard_size={SHARD_SIZE}",
        "--num_workers=2",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=child_env(PYTHONPATH=os.pathsep.join(sys.path))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "img/s" in done.stderr  # the progress bar
    assert f"{NUM_IMAGES} examples" in done.stdout and "complete" in done.stdout
    assert shard_bytes(out) == shard_bytes(workspace["out"])


def test_encode_of_a_finished_folder_rewrites_nothing(workspace):
    out = str(workspace["root"] / "finished")
    shutil.copytree(workspace["out"], out)
    stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
    source = open_image_folder(workspace["images"], IMAGE_SIZE, 2)
    try:
        manifest = encode.encode_images(source, out, workspace["vae"], settings(), progress=False)
    finally:
        source.close()
    assert manifest["complete"]
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)} == stamps


def test_encode_refuses_a_folder_of_other_settings_and_changes_nothing(workspace):
    out = str(workspace["root"] / "other_settings")
    shutil.copytree(workspace["out"], out)
    before = shard_bytes(out), open(os.path.join(out, "manifest.json")).read()
    source = open_image_folder(workspace["images"], IMAGE_SIZE, 2)
    try:
        with pytest.raises(encode.EncodeError, match=r"other settings .*dtype: 'float32' -> 'float16'"):
            encode.encode_images(source, out, workspace["vae"], settings(dtype="float16"), progress=False)
    finally:
        source.close()
    assert (shard_bytes(out), open(os.path.join(out, "manifest.json")).read()) == before


def test_encode_refuses_bad_settings_before_writing(workspace, tmp_path):
    config = workspace["vae"].config
    with pytest.raises(encode.EncodeError, match="--batch_size=12 must be a positive multiple of the 8"):
        encode.check_settings(settings(batch_size=12), config, 8)
    with pytest.raises(encode.EncodeError, match="--image_size=15 must be a positive multiple"):
        encode.check_settings(settings(image_size=15), config, 8)
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "notes.txt").write_text("x")
    source = open_image_folder(workspace["images"], IMAGE_SIZE, 2)
    try:
        with pytest.raises(encode.EncodeError, match="holds other files"):
            encode.encode_images(source, str(tmp_path / "busy"), workspace["vae"], settings(), progress=False)
    finally:
        source.close()
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


# --- reading -----------------------------------------------------------------------------------


def test_reader_gives_scaled_posterior_samples_drawn_afresh_each_epoch(workspace):
    out = workspace["out"]
    source = make_dataset(latent_config(out, shuffle=False), batch_size=NUM_IMAGES, seed=0)
    moments = stored_moments(out)
    mean, std = moments[:, 0, 0], moments[:, 0, 1]
    scale = workspace["manifest"]["scaling_factor"]
    epochs = [source.next_batch() for _ in range(20)]
    z = np.stack([(b["x"] / scale - mean) / std for b in epochs])  # standardised draws
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    assert abs(np.corrcoef(z[0].ravel(), z[1].ravel())[0, 1]) < 0.1  # a new draw each epoch
    np.testing.assert_array_equal(epochs[0]["label"], [0] * 5 + [1] * 6)
    assert source.spec.shape == (8, 8, 4) and source.spec.num_classes == 2


def write_latent_set(root, means, labels, shard_size, **manifest_fields):
    """A hand-made set with the encoder's file format: std 0, the given means [n, 2, h, w, c]."""
    os.makedirs(root)
    n = len(means)
    shards = []
    for s, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        moments = np.zeros((stop - start, 2, 2, *means.shape[2:]), np.float32)
        moments[:, :, 0] = means[start:stop]
        moments_path, labels_path = latent_format.shard_paths(root, s)
        np.save(moments_path, moments)
        np.save(labels_path, labels[start:stop].astype(np.int32))
        shards.append({"index": s, "start": start, "count": stop - start})
    manifest = {
        "format": latent_format.FORMAT,
        "version": latent_format.FORMAT_VERSION,
        "complete": True,
        "count": n,
        "num_classes": int(labels.max()) + 1,
        "image_size": 8 * means.shape[2],
        "vae": {"name": "test/vae", "weights_sha256": "ab" * 32},
        "scaling_factor": 0.5,
        "shift_factor": 0.0,
        "latent_shape": list(means.shape[2:]),
        "dtype": "float32",
        "shard_size": shard_size,
        "num_shards": len(shards),
        "shards": shards,
        **manifest_fields,
    }
    with open(os.path.join(root, latent_format.MANIFEST), "w") as f:
        json.dump(manifest, f)


def test_flip_picks_the_flipped_moments(tmp_path):
    n = 10
    means = np.zeros((n, 2, 2, 2, 1), np.float32)
    means[:, 0] = np.arange(n)[:, None, None, None] + 1  # example i: +(i + 1) as stored, -(i + 1) mirrored
    means[:, 1] = -means[:, 0]
    root = str(tmp_path / "set")
    write_latent_set(root, means, np.zeros(n, np.int64), shard_size=3)
    seed, batch = 5, 4
    source = make_dataset(latent_config(root, random_flip=True), batch_size=batch, seed=seed)
    rows = np.concatenate([source.next_batch()["x"][:, 0, 0, 0] for _ in range(10)]) / 0.5  # 40 positions, 4 epochs
    indices, flips = ExampleOrder(n, seed, shuffle=True).lookup(0, 40, with_flips=True)
    np.testing.assert_array_equal(rows, np.where(flips, -1, 1) * (indices + 1))
    assert 0 < flips.sum() < 40
    unflipped = make_dataset(latent_config(root, random_flip=False), batch_size=batch, seed=seed)
    assert (np.concatenate([unflipped.next_batch()["x"] for _ in range(10)]) > 0).all()


def test_reader_resume_mid_epoch_gives_the_same_next_batches(workspace):
    config = latent_config(workspace["out"], random_flip=True)
    first = make_dataset(config, batch_size=3, seed=7)
    for _ in range(5):  # 15 positions: into the second epoch of 11
        first.next_batch()
    state = first.get_state()
    expected = [first.next_batch() for _ in range(3)]
    resumed = make_dataset(config, batch_size=3, seed=7)
    resumed.set_state(json.loads(json.dumps(state)))
    first.set_state(state)  # back on a source whose worker has prepared a later batch
    for source in (resumed, first):
        for want in expected:
            got = source.next_batch()
            np.testing.assert_array_equal(got["x"], want["x"])
            np.testing.assert_array_equal(got["label"], want["label"])
        source.close()


def test_process_slices_make_up_the_global_batch(workspace):
    config = latent_config(workspace["out"], random_flip=True)
    whole = make_dataset(config, batch_size=6, seed=3)
    parts = [make_dataset(config, batch_size=3, seed=3, process_index=p, process_count=2) for p in range(2)]
    for _ in range(3):
        want = whole.next_batch()
        got = [part.next_batch() for part in parts]
        np.testing.assert_array_equal(np.concatenate([g["x"] for g in got]), want["x"])
        np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), want["label"])


def test_shards_are_memory_mapped_not_loaded(workspace):
    source = make_dataset(latent_config(workspace["out"]), batch_size=2, seed=0)
    for shard in source.latent_set._shards:  # noqa: SLF001
        assert not shard.array.flags.owndata and not shard.array.flags.writeable


def test_reference_is_seeded_unmirrored_and_scaled(workspace):
    source = make_dataset(latent_config(workspace["out"]), batch_size=2, seed=0)
    a, b, c = source.reference(6, seed=1), source.reference(6, seed=1), source.reference(6, seed=2)
    assert a.shape == (6, 8, 8, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 32}, r"latents of 16x16 images but data.image_size=32"),
        ({"latent_vae": "stabilityai/sd-vae-ft-mse"}, r"encoded with the VAE 'tiny-vae'.*data.latent_vae="),
        ({"latent_scale": 0.13025}, r"scaling factor 0.18215 but data.latent_scale=0.13025"),
    ],
)
def test_set_of_another_vae_size_or_scale_is_refused(workspace, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_data_config(latent_config(workspace["out"], **overrides))


def test_matching_expectations_are_accepted(workspace):
    sha = workspace["manifest"]["vae"]["weights_sha256"]
    for vae in ("tiny-vae", "someone/tiny-vae", sha[:12]):
        validate_data_config(
            latent_config(workspace["out"], image_size=IMAGE_SIZE, latent_vae=vae, latent_scale=0.18215)
        )


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_shard_is_named(workspace, tmp_path, damage):
    out = str(tmp_path / "damaged")
    shutil.copytree(workspace["out"], out)
    path = latent_format.shard_paths(out, 1)[0]
    with open(path, "r+b") as f:
        if damage == "truncate":
            f.truncate(os.path.getsize(path) - 100)
        else:
            f.write(b"garbage!")
    with pytest.raises(ValueError, match=r"shard_00001\.moments\.npy: .*(truncated|header)"):
        validate_data_config(latent_config(out))


def test_latent_keys_are_refused_for_other_readers():
    config = default_data_config()
    config.latent_vae = "stabilityai/sd-vae-ft-mse"
    with pytest.raises(ValueError, match="data.latent_vae / data.latent_scale describe pre-encoded latents"):
        validate_data_config(config)


def test_path_that_is_not_an_encoded_folder(tmp_path):
    with pytest.raises(ValueError, match="use data.name='arrays'"):
        validate_data_config(latent_config(str(tmp_path / "latents.npz")))
    with pytest.raises(ValueError, match="has no manifest.json"):
        validate_data_config(latent_config(str(tmp_path)))


def test_speed_benchmark_runs_on_a_tiny_setting(tmp_path):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "vae_speed.py")
    spec = importlib.util.spec_from_file_location("vae_speed", path)
    vae_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vae_speed)
    rows = vae_speed.main(
        [
            "--sections=encoder,reader",
            "--tiny",
            "--image_size=16",
            "--batch_size=8",
            "--num_batches=1",
            "--dtypes=float32",
            "--reader_examples=300",
            "--reader_shard_size=128",
            "--reader_batches=5",
            f"--reader_dir={tmp_path / 'synthetic'}",
        ]
    )
    encoder, reader = rows
    assert encoder["section"] == "encoder" and encoder["source_images_per_s"] > 0
    assert reader["examples"] == 300 and reader["latents_per_s"] > 0
    assert len([n for n in os.listdir(tmp_path / "synthetic") if n.endswith(".moments.npy")]) == 3


def test_tfds_data_set_encodes_like_the_same_images_in_a_folder(workspace, tmp_path):
    import grain  # noqa: F401  (the reader the pipeline uses)
    import tensorflow_datasets as tfds

    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in files_in_order(workspace["images"])]
    labels = [0] * 5 + [1] * 6

    class EncodeTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                        "label": tfds.features.ClassLabel(num_classes=2),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (image, label) in enumerate(zip(pixels, labels)):
                yield i, {"image": Image.fromarray(image), "label": label}

    data_dir = str(tmp_path / "tfds")
    EncodeTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    source = IMAGE_SOURCES["tfds"]("encode_tiny_images", IMAGE_SIZE, 0, split="train", data_dir=data_dir)
    out = str(tmp_path / "encoded")
    try:
        manifest = encode.encode_images(source, out, workspace["vae"], settings(), progress=False)
    finally:
        source.close()
    assert manifest["source"]["type"] == "tfds" and manifest["source"]["tfds_name"] == "encode_tiny_images"
    assert manifest["count"] == NUM_IMAGES and manifest["num_classes"] == 2
    # TFDS stores the examples in an order of its own: match each to the folder's by its moments
    got, want = stored_moments(out), stored_moments(workspace["out"])
    got_labels = np.concatenate([np.load(latent_format.shard_paths(out, s)[1]) for s in range(3)])
    distance = np.abs(got[:, None] - want[None]).reshape(NUM_IMAGES, NUM_IMAGES, -1).max(-1)
    match = distance.argmin(1)
    assert sorted(match) == list(range(NUM_IMAGES)) and distance.min(1).max() < 1e-5
    np.testing.assert_array_equal(got_labels, np.asarray(labels)[match])


def test_seeded_vae_command_writes_a_folder_the_chain_loads_and_never_overwrites(tmp_path):
    """`python -m shortcut_jax.seeded_vae --out=DIR`: a diffusers-shaped folder that load_vae reads
    (the offline start of encode -> train -> sample); a second call on the same folder is refused
    in one line and leaves the files as they were."""
    import subprocess
    import sys

    from conftest import child_env

    out = str(tmp_path / "tiny-vae")
    cmd = [sys.executable, "-m", "shortcut_jax.seeded_vae", f"--out={out}", "--seed=3"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run(cmd, capture_output=True, text=True, env=child_env(PYTHONPATH=root), cwd=root)
    assert first.returncode == 0, first.stderr
    loaded = vae_weights.load_vae(out)
    assert loaded.config == VAEConfig.tiny()
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    again = subprocess.run(cmd, capture_output=True, text=True, env=child_env(PYTHONPATH=root), cwd=root)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert (
        again.stderr.strip().splitlines()[-1].endswith("exists: give a new folder (nothing already saved is replaced)")
    )
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
