"""Tests for the TFDS reader (shortcut_jax.data.tfds) on a genuine TFDS data set prepared in
ArrayRecord here: determinism, shuffling by epoch, per-process slices, exact resume (in this
process and through worker processes), the image-folder reader's pixels, the error messages,
and a few training steps of the real train loop reading it.

The data set is built by a ``GeneratorBasedBuilder`` defined below. TFDS encodes NumPy images
through TensorFlow, which is not needed here: the builder hands TFDS Pillow images, which it
encodes as PNG with Pillow, and writes ArrayRecord files with array-record's own writer.
Example ``i`` of 'train' has red channel ``5 i + 3`` everywhere (kept exactly by lossless PNG
and by resizing a constant), which identifies it in any batch; its other channels are noise.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import grain  # noqa: E402,F401  (the reader the pipeline uses)
import tensorflow_datasets as tfds  # noqa: E402

from conftest import child_env
from shortcut_jax import config_lib  # noqa: E402
from shortcut_jax.infra import checkpoint
from shortcut_jax.training import loop
from shortcut_jax.training.experiment import Experiment
from shortcut_jax.data import default_data_config, make_dataset, validate_data_config  # noqa: E402
from shortcut_jax.data.core import BatchLayout  # noqa: E402
from shortcut_jax.data.preprocess import centre_crop_resize  # noqa: E402
from shortcut_jax.data.tfds import TfdsInfo, TfdsSource  # noqa: E402

NAME = "shortcut_tiny_images"
NUM_TRAIN, NUM_TEST, NUM_CLASSES = 40, 8, 4


def train_pixels(i: int) -> np.ndarray:
    """Example i of 'train': HxW varies with i (so crops differ), red channel 5 i + 3."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (20 + i % 3, 24 + i % 5, 3), dtype=np.uint8)
    pixels[..., 0] = (5 * i + 3) % 256
    return pixels


class ShortcutTinyImages(tfds.core.GeneratorBasedBuilder):
    """40 + 8 small PNG images with 4 classes; config 'grey' has one channel."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rgb"), tfds.core.BuilderConfig(name="grey")]

    def _info(self):
        channels = 1 if self.builder_config.name == "grey" else 3
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(NUM_TRAIN)),
            "test": self._generate_examples(range(100, 100 + NUM_TEST)),
        }

    def _generate_examples(self, indices):
        for i in indices:
            image = Image.fromarray(train_pixels(i))
            if self.builder_config.name == "grey":
                image = image.convert("L")
            yield i, {"image": image, "label": i % NUM_CLASSES, "index": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    for config in ("rgb", "grey"):
        ShortcutTinyImages(data_dir=root, config=config, file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return root


def tfds_config(data_dir, **overrides):
    config = default_data_config()
    config.name = "tfds"
    config.tfds_name = f"{NAME}/rgb"
    config.data_dir = data_dir
    config.image_size = 16
    config.num_workers = 0
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def take(source, n):
    return [source.next_batch() for _ in range(n)]


def batches_equal(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x["x"], y["x"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b)
    )


def example_ids(x: np.ndarray) -> np.ndarray:
    """The training example behind each row, from its constant red channel."""
    red = np.round((x[..., 0] + 1.0) * 127.5)
    assert (red.min(axis=(1, 2)) == red.max(axis=(1, 2))).all(), "red channel is not constant"
    ids = (red[:, 0, 0] - 3) / 5
    assert np.array_equal(ids, np.round(ids))
    return ids.astype(int)


# --------------------------------------------------------------------------- stream


def test_tfds_and_image_folder_readers_give_identical_pixels(data_dir, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(NUM_TRAIN):
        Image.fromarray(train_pixels(i)).save(folder / f"{i:03d}.png")
    as_folder = default_data_config()
    as_folder.name, as_folder.path, as_folder.image_size, as_folder.shuffle = "image_folder", str(folder), 16, False
    with make_dataset(as_folder, batch_size=NUM_TRAIN, seed=0) as source:
        by_index = source.next_batch()["x"]
    with make_dataset(tfds_config(data_dir, shuffle=False), batch_size=NUM_TRAIN, seed=0) as source:
        batch = source.next_batch()
    ids = example_ids(batch["x"])
    assert sorted(ids) == list(range(NUM_TRAIN))
    np.testing.assert_array_equal(batch["x"], by_index[ids])
    # labels come from the data set, attached to the right examples
    np.testing.assert_array_equal(batch["label"], ids % NUM_CLASSES)
    assert batch["label"].dtype == np.int32 and batch["x"].dtype == np.float32


def test_spec_comes_from_the_dataset_info(data_dir):
    with make_dataset(tfds_config(data_dir), batch_size=4, seed=0) as source:
        assert source.spec.shape == (16, 16, 3) and source.spec.num_classes == NUM_CLASSES
        assert source.num_examples == NUM_TRAIN
    with make_dataset(tfds_config(data_dir, use_labels=False, split="test"), batch_size=4, seed=0) as source:
        assert source.spec.num_classes == 0 and source.num_examples == NUM_TEST
        assert (source.next_batch()["label"] == 0).all()


def test_grey_config_keeps_one_channel(data_dir):
    # image_size 0 is refused for images of several sizes; with a size every image is resized
    with pytest.raises(ValueError, match="data.image_size"):
        validate_data_config(tfds_config(data_dir, tfds_name=f"{NAME}/grey", image_size=0))
    with make_dataset(tfds_config(data_dir, tfds_name=f"{NAME}/grey", shuffle=False), batch_size=8, seed=0) as source:
        x = source.next_batch()["x"]
    assert source.spec.shape == (16, 16, 1) and x.shape == (8, 16, 16, 1)
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1


def test_each_epoch_visits_every_example_once_in_a_new_order(data_dir):
    with make_dataset(tfds_config(data_dir), batch_size=8, seed=0) as source:
        epochs = [np.concatenate([example_ids(b["x"]) for b in take(source, 5)]) for _ in range(2)]
    for ids in epochs:
        assert sorted(ids) == list(range(NUM_TRAIN))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.sort(epochs[0]))


def test_same_seed_same_batches_other_seed_differs(data_dir):
    config = tfds_config(data_dir, random_flip=True)
    with make_dataset(config, batch_size=6, seed=3) as a, make_dataset(config, batch_size=6, seed=3) as b:
        first, again = take(a, 8), take(b, 8)
    with make_dataset(config, batch_size=6, seed=4) as c:
        other = take(c, 8)
    assert batches_equal(first, again)
    assert not batches_equal(first, other)


def test_random_flip_mirrors_some_rows_and_leaves_the_others(data_dir):
    with (
        make_dataset(tfds_config(data_dir, random_flip=True), batch_size=20, seed=0) as flipped,
        make_dataset(tfds_config(data_dir), batch_size=20, seed=0) as plain,
    ):
        x_flip = np.concatenate([b["x"] for b in take(flipped, 4)])
        x_plain = np.concatenate([b["x"] for b in take(plain, 4)])
    mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(x_flip, x_plain)])
    same = np.array([np.array_equal(f, p) for f, p in zip(x_flip, x_plain)])
    assert (mirrored | same).all()
    assert 20 <= mirrored.sum() <= 60  # 80 fair coins


def test_process_slices_are_disjoint_and_cover_the_global_batch(data_dir):
    config = tfds_config(data_dir, random_flip=True)
    count, per_process, steps = 3, 4, 5  # global batch 12: batch 3 spans the epoch boundary
    with make_dataset(config, batch_size=per_process * count, seed=1) as whole:
        global_batches = take(whole, steps)
    slices = []
    for p in range(count):
        with make_dataset(config, batch_size=per_process, seed=1, process_index=p, process_count=count) as source:
            slices.append(take(source, steps))
    for step in range(steps):
        joined = {key: np.concatenate([slices[p][step][key] for p in range(count)]) for key in ("x", "label")}
        assert batches_equal([joined], [global_batches[step]])
    first_ids = np.concatenate([example_ids(slices[p][0]["x"]) for p in range(count)])
    assert len(set(first_ids)) == per_process * count  # within one epoch: distinct examples


def test_state_taken_mid_epoch_resumes_the_same_stream(data_dir):
    config = tfds_config(data_dir, random_flip=True)
    with make_dataset(config, batch_size=6, seed=2) as unbroken:
        expected = take(unbroken, 8)
    with make_dataset(config, batch_size=6, seed=2) as first:
        take(first, 3)
        state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    assert state["position"] == 18
    with make_dataset(config, batch_size=6, seed=2) as resumed:
        resumed.set_state(state)
        assert resumed.get_state() == state
        assert batches_equal(take(resumed, 5), expected[3:])  # crosses into epoch 2


def test_worker_processes_give_the_same_stream_and_resume(data_dir):
    config = tfds_config(data_dir, random_flip=True)
    with make_dataset(config, batch_size=6, seed=5) as threads:
        expected = take(threads, 6)
        state = threads.get_state()
        following = take(threads, 2)
    config.num_workers = 2  # each worker process builds every other batch
    with make_dataset(config, batch_size=6, seed=5) as workers:
        assert batches_equal(take(workers, 3), expected[:3])
        workers.set_state(state)  # the workers restart at the saved position
        assert batches_equal(take(workers, 2), following)


def test_reference_is_seeded_distinct_and_unflipped(data_dir):
    with make_dataset(tfds_config(data_dir, random_flip=True, shuffle=False), batch_size=NUM_TRAIN, seed=0) as source:
        a, b, c = source.reference(10, seed=1), source.reference(10, seed=1), source.reference(10, seed=2)
        everything = source.reference(1000, seed=0)
    with make_dataset(tfds_config(data_dir, shuffle=False), batch_size=NUM_TRAIN, seed=0) as plain:
        stored = plain.next_batch()["x"]
    assert a.shape == (10, 16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(example_ids(a))) == 10
    assert everything.shape == (NUM_TRAIN, 16, 16, 3)
    np.testing.assert_array_equal(everything, stored)  # stored order, no flips


def test_mocked_catalog_dataset_decoded_arrays_are_resized_as_images(monkeypatch):
    """tfds.testing.mock_data serves random decoded examples with MNIST's real feature spec
    (28x28x1 uint8, 10 classes) without the data set: the path for data sets whose images are
    stored as uint8 tensors rather than PNG/JPEG bytes."""
    with tfds.testing.mock_data(num_examples=20):
        records = tfds.data_source("mnist", split="train")
        info = TfdsInfo(
            name="mnist",
            full_name="mnist/3.0.1",
            data_dir="",
            split="train",
            num_examples=20,
            image_key="image",
            label_key="label",
            num_classes=10,
            channels=1,
            native_size=(28, 28),
            encoded=False,
        )
        with TfdsSource(records, info, layout=BatchLayout(20), seed=0, shuffle=False, image_size=14) as source:
            batch = source.next_batch()
        stored = [records[i] for i in range(20)]
    assert batch["x"].shape == (20, 14, 14, 1) and source.spec.num_classes == 10
    for row, example in zip(batch["x"], stored):
        expected = centre_crop_resize(Image.fromarray(example["image"][..., 0]), 14)
        np.testing.assert_array_equal(np.round((row[..., 0] + 1) * 127.5), expected)
    np.testing.assert_array_equal(batch["label"], [int(e["label"]) for e in stored])


# --------------------------------------------------------------------------- errors


def test_package_imports_without_tfds_and_grain_and_says_what_to_install():
    """TFDS and grain are imported only inside the reader: blocked, the package still imports
    and only data.name='tfds' asks for them."""
    code = (
        "import sys; sys.modules['tensorflow_datasets'] = None; sys.modules['grain'] = None\n"
        "from shortcut_jax.data import default_data_config, validate_data_config\n"
        "c = default_data_config(); c.name, c.tfds_name = 'tfds', 'mnist'\n"
        "try:\n    validate_data_config(c)\nexcept ValueError as e:\n    print(e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, env=child_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install -e '.[tfds]'" in done.stdout


def test_unprepared_dataset_names_the_dataset_the_data_dir_and_the_command(tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(ValueError) as error:
        validate_data_config(tfds_config(empty, tfds_name="mnist"))
    message = str(error.value)
    assert "'mnist'" in message and empty in message
    assert f"tfds build mnist --data_dir={empty} --file_format=array_record" in message


def test_manual_download_dataset_says_which_files_go_where(tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(ValueError) as error:
        validate_data_config(tfds_config(empty, tfds_name="imagenet2012"))
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert os.path.join(empty, "downloads", "manual") in message
    assert "tfds build imagenet2012" in message


def test_other_prepared_version_is_suggested(data_dir):
    with pytest.raises(ValueError, match=r"tfds_name='shortcut_tiny_images/rgb:1.0.0'"):
        validate_data_config(tfds_config(data_dir, tfds_name=f"{NAME}/rgb:0.9.0"))


def test_unknown_name_is_named(tmp_path):
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        validate_data_config(tfds_config(str(tmp_path), tfds_name="no_such_dataset_xyz"))


@pytest.mark.parametrize(
    "overrides, listed",
    [
        (dict(split="validation"), ["train (40)", "test (8)"]),
        (dict(image_key="picture"), ["'image'", "'label'", "'index'"]),
        (dict(label_key="class"), ["'image'", "'label'", "'index'"]),
        (dict(label_key="index"), ["class labels: ['label']"]),
    ],
)
def test_missing_split_or_key_lists_the_available_ones(data_dir, overrides, listed):
    with pytest.raises(ValueError) as error:
        validate_data_config(tfds_config(data_dir, **overrides))
    key = next(iter(overrides))
    assert f"data.{key}=" in str(error.value)
    for item in listed:
        assert item in str(error.value)


def test_missing_label_key_is_fine_without_labels(data_dir):
    validate_data_config(tfds_config(data_dir, label_key="class", use_labels=False))


def test_tfrecord_only_dataset_is_refused_with_the_conversion_command(data_dir, tmp_path):
    """The metadata of a data set prepared as TFRecord (writing TFRecord files needs TensorFlow;
    the check reads only the metadata, which is what TFDS writes for TFRecord)."""
    copy = tmp_path / "tfrecord"
    shutil.copytree(os.path.join(data_dir, NAME), copy / NAME)
    info_path = copy / NAME / "rgb" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError) as error:
        validate_data_config(tfds_config(str(copy)))
    message = str(error.value)
    assert "tfds convert_format" in message and "--out_file_format=array_record" in message
    assert f"tfds build {NAME}/rgb --data_dir={copy} --file_format=array_record" in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("tfds_name", "other/1.0.0"),
        ("split", "test"),
        ("shuffle", False),
        ("seed", 7),
        ("num_examples", 41),
    ],
)
def test_state_from_another_dataset_split_order_or_seed_is_refused(data_dir, key, value):
    with make_dataset(tfds_config(data_dir), batch_size=4, seed=0) as source:
        state = source.get_state()
        with pytest.raises(ValueError, match="another stream"):
            source.set_state({**state, key: value})


def test_state_of_another_reader_is_refused(data_dir):
    with make_dataset(tfds_config(data_dir), batch_size=4, seed=0) as source:
        with pytest.raises(ValueError, match="another data.name"):
            source.set_state({"position": 8, "num_examples": NUM_TRAIN})


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(tfds_name=""), "data.tfds_name"),
        (dict(path="/data/x"), "data.path"),
        (dict(cache_decoded=True), "data.cache_decoded"),
        (dict(num_workers=-1), "data.num_workers"),
    ],
)
def test_bad_tfds_fields_name_the_key(data_dir, overrides, key):
    with pytest.raises(ValueError, match=key):
        validate_data_config(tfds_config(data_dir, **overrides))


def test_tfds_keys_with_another_reader_name_the_fix(tmp_path):
    config = default_data_config()
    config.name, config.tfds_name = "digits", "cifar10"
    with pytest.raises(ValueError, match="set data.name='tfds'"):
        validate_data_config(config)


def test_cloud_data_dir_without_a_file_system_names_gcsfs(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("gcsfs", "tensorflow") else real(name, *a)
    )
    with pytest.raises(ValueError, match="pip install gcsfs"):
        validate_data_config(tfds_config("gs://bucket/tfds"))


# --------------------------------------------------------------------------- training


def tiny_dit_config(data_dir, **overrides):
    """A 2-block DiT on the 8x8 tiny data set, with labels, checkpoints every 2 steps."""
    c = config_lib.default_config()
    c.data = tfds_config(data_dir, image_size=8, random_flip=True)
    c.model.name, c.model.variant, c.model.patch_size = "dit", "", 2
    c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
    c.objective.sc_fraction = 0.25
    c.train.steps, c.train.batch_size = 4, 32
    c.train.log_every, c.train.ckpt_every, c.train.eval_every = 2, 2, 100
    c.train.progress_bar, c.train.use_tensorboard, c.train.async_ckpt = False, False, False
    c.eval.budgets = c.eval.grid_budgets = (1,)
    c.eval.grid_size, c.eval.metric = 4, "none"
    c.mesh.data = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def test_training_reads_the_dataset_saves_its_position_and_resumes(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    state = loop.train_and_evaluate(tiny_dit_config(data_dir), workdir)
    assert int(state.step) == 4
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        exp = Experiment(tiny_dit_config(data_dir), None)
        try:
            _, data_state, meta = ckpt.restore(4, exp.abstract_state)
        finally:
            exp.close()
    assert data_state["position"] == 4 * 32 and data_state["tfds_name"] == f"{NAME}/rgb/1.0.0"
    assert meta["num_classes"] == NUM_CLASSES and meta["data_shape"] == [8, 8, 3]
    # a resume with another seed would read another order: refused before anything compiles
    with pytest.raises(ValueError, match="another stream"):
        loop.train_and_evaluate(tiny_dit_config(data_dir, **{"seed": 1, "train.steps": 6}), workdir)
    state = loop.train_and_evaluate(tiny_dit_config(data_dir, **{"train.steps": 6}), workdir)
    assert int(state.step) == 6
    # the resumed run is the unbroken one: same batches from the saved position, same updates
    unbroken = loop.train_and_evaluate(tiny_dit_config(data_dir, **{"train.steps": 6}), str(tmp_path / "unbroken"))
    resumed_leaves, unbroken_leaves = (jax.tree.leaves(jax.device_get(s)) for s in (state, unbroken))
    assert len(resumed_leaves) == len(unbroken_leaves)
    for a, b in zip(resumed_leaves, unbroken_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
