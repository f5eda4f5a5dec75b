"""Tests for shortcut_jax.data: validation messages, determinism, resumption, multi-host slicing,
toy supports, image decoding and archive extraction. Uses only tiny data built in tmp_path."""

import io
import json
import os
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import write_tar
from shortcut_jax.data import (
    READERS,
    default_data_config,
    extract_archive,
    make_dataset,
    validate_data_config,
)
from shortcut_jax.data import toy
from shortcut_jax.data.core import BatchLayout

CLASS_SIZES = {"cat": 4, "dog": 3, "eel": 5}  # 12 images, so batches of 5 straddle epochs


def make_config(**overrides):
    config = default_data_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def take(source, n):
    return [source.next_batch() for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["x"], y["x"])
        np.testing.assert_array_equal(x["label"], y["label"])


def write_image(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def class_folder(tmp_path):
    """root/<class>/<i>.png with 6x6 RGB images; returns (root, {relative path: pixels})."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    pixels = {}
    for name, count in CLASS_SIZES.items():
        for i in range(count):
            relative = os.path.join(name, f"{i:02d}.png")
            pixels[relative] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            write_image(str(root / relative), pixels[relative])
    return str(root), pixels


def folder_config(root, **overrides):
    return make_config(name="image_folder", path=root, num_workers=3, **overrides)


def sources_for_stream_tests(tmp_path, class_folder):
    """(name, config) pairs covering every kind of stream state."""
    rng = np.random.default_rng(1)
    npz = str(tmp_path / "arrays.npz")
    np.savez(npz, x=rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8), labels=rng.integers(0, 3, 12))
    return [
        ("arrays", make_config(name="arrays", path=npz, random_flip=True)),
        ("image_folder", folder_config(class_folder[0], random_flip=True)),
        ("image_folder_cached", folder_config(class_folder[0], random_flip=True, cache_decoded=True)),
        ("checkerboard", make_config(name="checkerboard")),
    ]


# --- validation -------------------------------------------------------------------------------


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as error:
        validate_data_config(make_config(name="cifar"))
    for name in ("checkerboard", "gaussian_mixture", "two_moons", "spiral", "digits", "arrays", "image_folder"):
        assert name in str(error.value)
    assert set(READERS) >= {"checkerboard", "digits", "arrays", "image_folder"}


@pytest.mark.parametrize("name", ["arrays", "image_folder"])
@pytest.mark.parametrize("path", ["", "/nonexistent/data.npz"])
def test_missing_path_names_the_key(name, path):
    with pytest.raises(ValueError, match="data.path"):
        validate_data_config(make_config(name=name, path=path))


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="empty folder"):
        validate_data_config(folder_config(str(tmp_path)))


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images") as error:
        validate_data_config(folder_config(str(tmp_path)))
    assert "notes.txt" in str(error.value)


def test_broken_image_is_named(class_folder):
    root, _ = class_folder
    with open(os.path.join(root, "dog", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    # A hidden resource-fork file with an image extension must be skipped, not reported.
    with open(os.path.join(root, "dog", "._01.png"), "wb") as f:
        f.write(b"resource fork")
    with pytest.raises(ValueError) as error:
        validate_data_config(folder_config(root))
    message = str(error.value)
    assert os.path.join("dog", "broken.png") in message
    assert "._01.png" not in message
    assert "1 of 13" in message
    with pytest.raises(ValueError, match="broken.png"):
        make_dataset(folder_config(root), batch_size=2, seed=0)


def test_file_broken_after_a_scan_is_still_found(class_folder):
    root, _ = class_folder
    validate_data_config(folder_config(root))
    with open(os.path.join(root, "eel", "03.png"), "wb") as f:
        f.write(b"truncated")
    with pytest.raises(ValueError, match="03.png"):
        validate_data_config(folder_config(root))


def test_many_broken_files_listing_is_capped(tmp_path):
    for i in range(15):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError) as error:
        validate_data_config(folder_config(str(tmp_path)))
    message = str(error.value)
    listed = [line for line in message.splitlines() if line.startswith("  bad")]
    assert len(listed) == 10 and "and 5 more" in message


def test_class_folder_without_images_is_rejected(class_folder):
    root, _ = class_folder
    os.makedirs(os.path.join(root, "zebra"))
    with pytest.raises(ValueError, match="zebra"):
        validate_data_config(folder_config(root))


def test_mixed_sizes_need_image_size(tmp_path):
    write_image(str(tmp_path / "a.png"), np.zeros((6, 6, 3), np.uint8))
    write_image(str(tmp_path / "b.png"), np.zeros((8, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="data.image_size"):
        validate_data_config(folder_config(str(tmp_path)))
    source = make_dataset(folder_config(str(tmp_path), image_size=4), batch_size=2, seed=0)
    assert source.spec.shape == (4, 4, 3)
    assert source.next_batch()["x"].shape == (2, 4, 4, 3)
    source.close()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(image_size=-1), "data.image_size"),
        (dict(num_workers=0), "data.num_workers"),
        (dict(random_flip=True), "data.random_flip"),  # checkerboard gives points
        (dict(path="/tmp/x.npz"), "data.path"),
        (dict(name="digits", image_size=16), "data.image_size"),
        (dict(shuffle="yes"), "data.shuffle"),
    ],
)
def test_bad_fields_name_the_key(overrides, key):
    config = default_data_config().to_dict()  # a plain dict, which readers also accept
    config.update(overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_data_config(config)


def test_unknown_key_is_rejected():
    config = default_data_config().to_dict()
    config["imagesize"] = 32
    with pytest.raises(ValueError, match="imagesize"):
        validate_data_config(config)


def test_bad_run_arguments():
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(make_config(), batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(make_config(), batch_size=0, seed=0)


# --- arrays -----------------------------------------------------------------------------------


def test_npz_images_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)  # [N, H, W]
    labels = np.array([0, 2, 0, 2, 0, 2])
    path = str(tmp_path / "data.npz")
    np.savez(path, x=images, labels=labels)
    source = make_dataset(make_config(name="arrays", path=path, shuffle=False), batch_size=6, seed=0)
    assert source.spec.shape == (4, 3, 1) and source.spec.kind == "images"
    assert source.spec.num_classes == 3  # max + 1, not the number of distinct labels
    batch = source.next_batch()
    assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["x"][..., 0], images / np.float32(127.5) - 1)
    np.testing.assert_array_equal(batch["label"], labels)


def test_npz_alternative_keys(tmp_path):
    path = str(tmp_path / "data.npz")
    np.savez(path, images=np.zeros((3, 2, 2, 3), np.uint8), y=np.array([1, 1, 0], np.int64))
    source = make_dataset(make_config(name="arrays", path=path), batch_size=2, seed=0)
    assert source.spec == type(source.spec)((2, 2, 3), 2, "images")


def test_npy_points_unlabelled(tmp_path):
    points = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float64)
    path = str(tmp_path / "points.npy")
    np.save(path, points)
    source = make_dataset(make_config(name="arrays", path=path), batch_size=7, seed=0)
    assert source.spec.kind == "points" and source.spec.shape == (3,)
    assert source.spec.num_classes == 0
    batch = source.next_batch()
    assert (batch["label"] == 0).all()
    # One batch of N rows is one shuffled epoch of the data, values taken as is.
    np.testing.assert_array_equal(np.sort(batch["x"], axis=0), np.sort(points.astype(np.float32), axis=0))


def test_use_labels_false(tmp_path):
    path = str(tmp_path / "data.npz")
    np.savez(path, x=np.zeros((4, 2), np.float32), labels=np.array([0, 1, 2, 3]))
    source = make_dataset(make_config(name="arrays", path=path, use_labels=False), batch_size=4, seed=0)
    assert source.spec.num_classes == 0 and (source.next_batch()["label"] == 0).all()


def test_mismatched_label_length(tmp_path):
    path = str(tmp_path / "data.npz")
    np.savez(path, x=np.zeros((4, 2), np.float32), labels=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="labels.*shape"):
        validate_data_config(make_config(name="arrays", path=path))


def test_float_labels_rejected(tmp_path):
    path = str(tmp_path / "data.npz")
    np.savez(path, x=np.zeros((3, 2), np.float32), labels=np.array([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="integers"):
        validate_data_config(make_config(name="arrays", path=path))


def test_npz_without_data_key_names_keys(tmp_path):
    path = str(tmp_path / "data.npz")
    np.savez(path, pixels=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="pixels"):
        validate_data_config(make_config(name="arrays", path=path))


def test_reference_draws_without_replacement(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    path = str(tmp_path / "points.npy")
    np.save(path, x)
    source = make_dataset(make_config(name="arrays", path=path), batch_size=2, seed=0)
    ref = source.reference(4, seed=3)
    assert ref.shape == (4, 2) and ref.dtype == np.float32
    assert len({tuple(r) for r in ref}) == 4
    assert all(any((r == row).all() for row in x) for r in ref)
    np.testing.assert_array_equal(ref, source.reference(4, seed=3))
    assert not np.array_equal(ref, source.reference(4, seed=4))
    np.testing.assert_array_equal(np.sort(source.reference(100, seed=0), axis=0), x)


# --- stream semantics -------------------------------------------------------------------------


def test_epochs_are_permutations_and_batches_span_them(tmp_path):
    path = str(tmp_path / "ids.npy")
    np.save(path, np.arange(10, dtype=np.float32)[:, None])
    source = make_dataset(make_config(name="arrays", path=path), batch_size=4, seed=0)
    stream = np.concatenate([b["x"][:, 0] for b in take(source, 5)]).astype(int)
    first, second = stream[:10], stream[10:]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(10))
    unshuffled = make_dataset(make_config(name="arrays", path=path, shuffle=False), batch_size=4, seed=0)
    stream = np.concatenate([b["x"][:, 0] for b in take(unshuffled, 5)]).astype(int)
    np.testing.assert_array_equal(stream, np.tile(np.arange(10), 2))


def test_same_seed_same_batches_other_seed_differs(tmp_path, class_folder):
    for name, config in sources_for_stream_tests(tmp_path, class_folder):
        a, b, c = (make_dataset(config, batch_size=5, seed=s) for s in (7, 7, 8))
        batches_a = take(a, 4)
        assert_batches_equal(batches_a, take(b, 4))
        assert not np.array_equal(batches_a[0]["x"], take(c, 1)[0]["x"]), name
        for source in (a, b, c):
            source.close()


@pytest.mark.parametrize("skip", [1, 2, 3])  # with 12 examples, batch 5: 2 and 3 cross an epoch
def test_resume_gives_identical_batches(tmp_path, class_folder, skip):
    for name, config in sources_for_stream_tests(tmp_path, class_folder):
        original = make_dataset(config, batch_size=5, seed=0)
        take(original, skip)
        state = json.loads(json.dumps(original.get_state()))
        expected = take(original, 3)
        resumed = make_dataset(config, batch_size=5, seed=0)
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 3), expected)
        # Rewinding a source whose next batch is already being decoded.
        original.set_state(state)
        assert_batches_equal(take(original, 3), expected)
        original.close()
        resumed.close()


def test_state_describes_returned_batches_not_prefetched(class_folder):
    source = make_dataset(folder_config(class_folder[0]), batch_size=5, seed=0)
    assert source.get_state()["position"] == 0
    take(source, 2)
    assert source.get_state() == {"position": 10, "num_examples": 12}
    source.close()


def test_state_from_other_data_is_rejected(tmp_path, class_folder):
    config = sources_for_stream_tests(tmp_path, class_folder)[0][1]
    source = make_dataset(config, batch_size=5, seed=0)
    with pytest.raises(ValueError, match="data.path"):
        source.set_state({"position": 5, "num_examples": 99})


def test_multi_host_slices_union_to_global_batch(tmp_path, class_folder):
    for name, config in sources_for_stream_tests(tmp_path, class_folder):
        whole = make_dataset(config, batch_size=6, seed=3)
        parts = [make_dataset(config, batch_size=3, seed=3, process_index=p, process_count=2) for p in range(2)]
        for _ in range(4):
            expected = whole.next_batch()
            pieces = [part.next_batch() for part in parts]
            for key in ("x", "label"):
                np.testing.assert_array_equal(np.concatenate([piece[key] for piece in pieces]), expected[key], name)
        for source in (whole, *parts):
            source.close()


def test_decoded_cache_gives_the_same_stream_and_reference(class_folder):
    root = class_folder[0]
    plain, cached = (
        make_dataset(folder_config(root, random_flip=True, cache_decoded=c), batch_size=5, seed=2)
        for c in (False, True)
    )
    assert_batches_equal(take(cached, 7), take(plain, 7))  # 35 examples: three epochs, flips
    np.testing.assert_array_equal(cached.reference(9, seed=4), plain.reference(9, seed=4))
    for source in (plain, cached):
        source.close()


def test_decoded_cache_decodes_each_file_once_up_front(class_folder, monkeypatch):
    from shortcut_jax.data import image_folder

    calls = []
    real = image_folder.load_image
    monkeypatch.setattr(image_folder, "load_image", lambda path, size: calls.append(path) or real(path, size))
    source = make_dataset(folder_config(class_folder[0], cache_decoded=True), batch_size=5, seed=0)
    assert sorted(calls) == sorted(source._files)
    take(source, 6)
    source.reference(4, seed=0)
    assert len(calls) == len(source._files)
    source.close()


def test_decoded_cache_filled_by_worker_processes_gives_the_same_stream(class_folder, monkeypatch):
    from shortcut_jax.data import image_folder

    monkeypatch.setattr(image_folder, "CACHE_PROCESSES_FROM", 0)
    monkeypatch.setattr(image_folder, "CACHE_MIN_PROCESSES", 2)
    monkeypatch.setattr(image_folder.os, "cpu_count", lambda: 3)
    monkeypatch.setattr(image_folder, "CACHE_CHUNK", 5)  # 12 images: three tasks, three processes
    calls = []
    real = image_folder._decode_in_subprocess
    monkeypatch.setattr(image_folder, "_decode_in_subprocess", lambda *a: calls.append(len(a[0])) or real(*a))
    root = class_folder[0]
    plain, cached = (
        make_dataset(folder_config(root, random_flip=True, cache_decoded=c), batch_size=5, seed=2)
        for c in (False, True)
    )
    assert sorted(calls) == [2, 5, 5]
    assert_batches_equal(take(cached, 5), take(plain, 5))
    for source in (plain, cached):
        source.close()
    # A file that disappears after the scan: the worker's error reaches the caller, naming it.
    index = image_folder.scan_image_folder(root, 0, 3)
    os.remove(os.path.join(root, "dog", "01.png"))
    with pytest.raises(RuntimeError, match="01.png"):
        image_folder.ImageFolderSource(index, layout=BatchLayout(5), seed=0, num_workers=3, cache_decoded=True)


def test_decoded_cache_larger_than_memory_is_refused(class_folder, monkeypatch):
    from shortcut_jax.data import image_folder

    monkeypatch.setattr(image_folder, "_available_memory", lambda: 1000)  # 12 images of 6x6x3: 1,296 bytes
    with pytest.raises(ValueError, match="data.cache_decoded=False"):
        make_dataset(folder_config(class_folder[0], cache_decoded=True), batch_size=5, seed=0)


@pytest.mark.parametrize("name", ["checkerboard", "digits"])
def test_decoded_cache_is_for_image_folders_only(name):
    with pytest.raises(ValueError, match="data.cache_decoded=False"):
        make_dataset(make_config(name=name, cache_decoded=True), batch_size=4, seed=0)


def test_close_stops_worker_threads(class_folder):
    before = set(threading.enumerate())
    source = make_dataset(folder_config(class_folder[0]), batch_size=5, seed=0)
    take(source, 2)
    started = [t for t in threading.enumerate() if t not in before]
    assert any(t.name.startswith("image_folder") for t in started)
    source.close()
    assert not [t for t in started if t.is_alive()]
    with pytest.raises(RuntimeError):
        source.next_batch()


# --- toy distributions ------------------------------------------------------------------------


def toy_points(name, n=4000, seed=0):
    source = make_dataset(make_config(name=name), batch_size=n, seed=seed)
    assert source.spec.shape == (2,) and source.spec.kind == "points"
    batch = source.next_batch()
    assert batch["x"].dtype == np.float32 and (batch["label"] == 0).all()
    return batch["x"].astype(np.float64)


def test_checkerboard_fills_even_squares():
    x = toy_points("checkerboard")
    assert (np.abs(x) <= 2).all()
    cells = np.floor(x).astype(int)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells}) == 8


def test_gaussian_mixture_points_sit_near_the_eight_centres():
    x = toy_points("gaussian_mixture")
    angles = np.arange(8) * np.pi / 4
    centres = toy.GAUSSIAN_MIXTURE_RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1)
    distances = np.linalg.norm(x[:, None] - centres[None], axis=-1)
    assert (distances.min(1) < 6 * toy.GAUSSIAN_MIXTURE_STD).all()
    assert set(distances.argmin(1)) == set(range(8))


def test_two_moons_points_lie_on_the_arcs():
    x = toy_points("two_moons") / toy.TWO_MOONS_SCALE + np.array([0.5, 0.25])
    upper = np.abs(np.linalg.norm(x, axis=1) - 1)
    lower = np.abs(np.linalg.norm(x - np.array([1.0, 0.5]), axis=1) - 1)
    tolerance = 6 * toy.TWO_MOONS_NOISE / toy.TWO_MOONS_SCALE
    assert (np.minimum(upper, lower) < tolerance).all()
    assert (upper < tolerance).mean() > 0.3 and (lower < tolerance).mean() > 0.3


def test_spiral_points_lie_on_the_arm():
    x = toy_points("spiral")
    radius = np.linalg.norm(x, axis=1)
    assert (radius < toy.SPIRAL_MAX_RADIUS + 6 * toy.SPIRAL_NOISE).all()
    # The arm at angle phi + 2 pi k has radius proportional to that angle; each point must be
    # close to one of the turns through its direction.
    phi = np.mod(np.arctan2(x[:, 1], x[:, 0]), 2 * np.pi)
    per_radian = toy.SPIRAL_MAX_RADIUS / (2 * np.pi * toy.SPIRAL_TURNS)
    turns = np.stack([(phi + 2 * np.pi * k) * per_radian for k in range(3)], 1)
    assert (np.abs(turns - radius[:, None]).min(1) < 0.3).mean() > 0.99


def test_toy_reference_is_seeded_and_sized():
    source = make_dataset(make_config(name="two_moons"), batch_size=4, seed=0)
    ref = source.reference(50, seed=1)
    assert ref.shape == (50, 2) and ref.dtype == np.float32
    np.testing.assert_array_equal(ref, source.reference(50, seed=1))
    assert not np.array_equal(ref, source.reference(50, seed=2))


# --- digits and images ------------------------------------------------------------------------


def test_digits():
    source = make_dataset(make_config(name="digits"), batch_size=1797, seed=0)
    assert source.spec == type(source.spec)((8, 8, 1), 10, "images")
    assert source.num_examples == 1797
    batch = source.next_batch()
    assert batch["x"].shape == (1797, 8, 8, 1)
    assert batch["x"].min() == -1.0 and batch["x"].max() == 1.0
    assert sorted(set(batch["label"].tolist())) == list(range(10))


def test_image_folder_contents_and_labels(class_folder):
    root, pixels = class_folder
    source = make_dataset(folder_config(root, shuffle=False), batch_size=12, seed=0)
    assert source.spec == type(source.spec)((6, 6, 3), 3, "images")
    assert source.class_names == ("cat", "dog", "eel")
    batch = source.next_batch()
    ordered = sorted(pixels)  # class folders and file names, both sorted
    expected_x = np.stack([pixels[p] for p in ordered]) / np.float32(127.5) - 1
    np.testing.assert_array_equal(batch["x"], expected_x)
    np.testing.assert_array_equal(batch["label"], [0] * 4 + [1] * 3 + [2] * 5)
    source.close()


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        write_image(str(tmp_path / f"{i}.JPG"), np.full((4, 4, 3), 40 * i, np.uint8))
    source = make_dataset(folder_config(str(tmp_path)), batch_size=3, seed=0)
    assert source.spec.num_classes == 0
    assert (source.next_batch()["label"] == 0).all()
    source.close()


def test_grayscale_images_become_rgb(tmp_path):
    Image.fromarray(np.full((5, 5), 200, np.uint8), mode="L").save(tmp_path / "g.png")
    source = make_dataset(folder_config(str(tmp_path)), batch_size=1, seed=0)
    x = source.next_batch()["x"]
    assert x.shape == (1, 5, 5, 3) and np.allclose(x, 200 / 127.5 - 1)
    source.close()


def test_random_flip_is_deterministic_and_mirrors(class_folder):
    root, pixels = class_folder
    images = np.stack([pixels[p] for p in sorted(pixels)]) / np.float32(127.5) - 1
    config = folder_config(root, shuffle=False, random_flip=True)
    a, b = (make_dataset(config, batch_size=12, seed=5) for _ in range(2))
    epochs = take(a, 4)
    assert_batches_equal(epochs, take(b, 4))
    flipped = []
    for batch in epochs:
        same = (batch["x"] == images).all(axis=(1, 2, 3))
        mirrored = (batch["x"] == images[:, :, ::-1]).all(axis=(1, 2, 3))
        assert (same | mirrored).all()
        flipped.append(mirrored)
    flipped = np.concatenate(flipped)
    assert 0.2 < flipped.mean() < 0.8
    # The same image is flipped differently in different epochs.
    assert not all(np.array_equal(flipped[:12], flipped[12 * e : 12 * e + 12]) for e in range(4))
    for source in (a, b):
        source.close()


def test_centre_crop_and_resize(tmp_path):
    # A 30x20 (WxH) image whose centre square is green and whose side margins are red.
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :5, 0] = pixels[:, 25:, 0] = 255
    pixels[:, 5:25, 1] = 255
    write_image(str(tmp_path / "wide.png"), pixels)
    # A 10x10 image with a gradient, to compare against Pillow's own bicubic resize.
    gradient = np.broadcast_to(np.arange(0, 250, 25, dtype=np.uint8)[None, :, None], (10, 10, 3))
    write_image(str(tmp_path / "square.png"), np.ascontiguousarray(gradient))
    source = make_dataset(folder_config(str(tmp_path), shuffle=False, image_size=8), batch_size=2, seed=0)
    x = source.next_batch()["x"]
    assert x.shape == (2, 8, 8, 3)
    square, wide = x  # sorted file names: square.png, wide.png
    assert (wide[..., 0] == -1).all() and (wide[..., 1] == 1).all()
    expected = (
        np.asarray(Image.fromarray(np.ascontiguousarray(gradient)).resize((8, 8), Image.Resampling.BICUBIC))
        / np.float32(127.5)
        - 1
    )
    np.testing.assert_array_equal(square, expected)
    source.close()


def test_image_folder_reference(class_folder):
    root, pixels = class_folder
    source = make_dataset(folder_config(root, random_flip=True), batch_size=2, seed=0)
    ref = source.reference(5, seed=0)
    assert ref.shape == (5, 6, 6, 3)
    originals = {(pixels[p] / np.float32(127.5) - 1).tobytes() for p in pixels}
    assert all(r.tobytes() in originals for r in ref)  # reference rows are never flipped
    assert len({r.tobytes() for r in ref}) == 5
    assert source.reference(50, seed=0).shape == (12, 6, 6, 3)
    source.close()


# --- archives ---------------------------------------------------------------------------------


def png_bytes(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_extract_archive_once_and_read_as_folder(tmp_path):
    archive = str(tmp_path / "set-train.tar.gz")
    write_tar(archive, {f"set/train/{c}/{i:04d}.png": png_bytes(10 * i) for c in ("a", "b") for i in range(3)})
    dest = str(tmp_path / "cache")
    root = extract_archive(archive, dest)
    assert root == os.path.join(dest, "set", "train")
    assert sorted(os.listdir(root)) == ["a", "b"]
    os.remove(os.path.join(root, "a", "0000.png"))
    assert extract_archive(archive, dest) == root
    assert not os.path.exists(os.path.join(root, "a", "0000.png"))  # not extracted again
    source = make_dataset(folder_config(root), batch_size=5, seed=0)
    assert source.spec.num_classes == 2 and source.num_examples == 5
    source.close()


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/tmp/evil.txt", "ok/../../evil.txt"])
def test_extract_archive_refuses_path_traversal(tmp_path, bad_name):
    archive = str(tmp_path / "bad.tar.gz")
    write_tar(archive, {"fine/1.png": png_bytes(1), bad_name: b"x"})
    dest = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match="outside"):
        extract_archive(archive, str(dest))
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (dest / "fine").exists()  # nothing is written when any member is unsafe


def test_extract_archive_refuses_links(tmp_path):
    archive = str(tmp_path / "link.tar")
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("data/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="link"):
        extract_archive(archive, str(tmp_path / "cache"))
