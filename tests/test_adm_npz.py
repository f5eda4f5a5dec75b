"""Tests for shortcut_jax.evaluation.adm_npz: the ADM evaluator's sample file."""

import os
import zipfile

import numpy as np
import pytest

from shortcut_jax.evaluation.adm_npz import (
    ADMSampleWriter,
    adm_npz_image_shape,
    read_adm_npz,
    write_adm_npz,
)


def _images(n, h=8, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_streamed_file_round_trips_and_reads_as_arr_0_arr_1(tmp_path):
    images, labels = _images(7), np.array([3, 1, 4, 1, 5, 9, 2])
    path = tmp_path / "out" / "samples.npz"
    with ADMSampleWriter(str(path), num_images=7, image_shape=(8, 6, 3), with_labels=True) as w:
        for start in (0, 3, 5):  # uneven batches
            stop = {0: 3, 3: 5, 5: 7}[start]
            w.add(images[start:stop], labels[start:stop])
    # What the ADM evaluator and np.load see: uint8 NHWC arr_0 and the labels as arr_1.
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["arr_1"], labels)
    got_images, got_labels = read_adm_npz(str(path))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert adm_npz_image_shape(str(path)) == (7, 8, 6, 3)
    # Stored, not compressed, as np.savez writes it (the evaluator reads arr_0 in slices).
    with zipfile.ZipFile(path) as archive:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
    assert [p.name for p in path.parent.iterdir()] == ["samples.npz"]  # no partial file left


def test_float_samples_are_written_as_their_8_bit_images(tmp_path):
    images = _images(4, seed=1)
    floats = images.astype(np.float32) / 127.5 - 1.0
    floats[0, 0, 0] = [-1.7, 1.3, 0.0]  # out of range: clipped, as a saved PNG would be
    write_adm_npz(str(tmp_path / "s.npz"), floats)
    got, labels = read_adm_npz(str(tmp_path / "s.npz"))
    assert labels is None
    expected = images.copy()
    expected[0, 0, 0] = [0, 255, 128]
    np.testing.assert_array_equal(got, expected)


def test_incomplete_or_overfull_writers_leave_no_file(tmp_path):
    path = tmp_path / "s.npz"
    with pytest.raises(ValueError, match="2 of 5 images were added"):
        with ADMSampleWriter(str(path), num_images=5, image_shape=(8, 6, 3)) as w:
            w.add(_images(2))
    assert not path.exists() and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="exceeds num_images=3"):
        with ADMSampleWriter(str(path), num_images=3, image_shape=(8, 6, 3)) as w:
            w.add(_images(4))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"images have shape \(8, 8, 3\)"):
        with ADMSampleWriter(str(path), num_images=3, image_shape=(8, 6, 3)) as w:
            w.add(_images(3, 8, 8))
    with pytest.raises(ValueError, match="pass them"):
        with ADMSampleWriter(str(path), num_images=3, image_shape=(8, 6, 3), with_labels=True) as w:
            w.add(_images(3))
    assert os.listdir(tmp_path) == []


def test_reading_refuses_files_that_are_not_adm_samples(tmp_path):
    np.savez(tmp_path / "x.npz", x=_images(2))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        read_adm_npz(str(tmp_path / "x.npz"))
    assert adm_npz_image_shape(str(tmp_path / "x.npz")) is None
    np.savez(tmp_path / "f.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        read_adm_npz(str(tmp_path / "f.npz"))
