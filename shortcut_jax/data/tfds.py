"""TFDS data sets (ImageNet, CelebA-HQ, CIFAR-10, MNIST, LSUN, any TFDS name) read through grain.

Config: ``data.name='tfds'``, ``data.tfds_name`` (``'imagenet2012'``, ``'celeb_a_hq/256'``,
``'cifar10:3.0.2'``, ...), ``data.split`` (TFDS's syntax, ``'train[:90%]'`` too),
``data.data_dir`` (local or ``gs://``; '' is TFDS's default), ``data.image_key``,
``data.label_key``, ``data.image_size``, ``data.random_flip``, ``data.use_labels``,
``data.shuffle``, ``data.num_workers``.

Reading
-------
Examples are read by random access from the ArrayRecord files TFDS prepared
(``builder.as_data_source``): TensorFlow is not needed to read, only to prepare. Image features
are read as their stored PNG/JPEG bytes and decoded here with Pillow, converted to the data
set's channel count (3, or 1 for grey data sets such as MNIST), then centre-cropped and resized
by ``preprocess.centre_crop_resize``, the function the image-folder reader uses, so the same
file gives the same pixels through either reader. ``num_classes`` comes from the label's
``ClassLabel`` feature.

Data sets that TFDS prepared only as TFRecord are refused, with the command that converts them
to ArrayRecord: a tf.data path would need TensorFlow on every training host and bring a second
pipeline whose order and resume differ from this one, while converting is done once.

Stream
------
The stream model of every finite reader (``core``): epochs laid end to end, position ``q`` is
example ``shuffle_e(q mod N)`` of epoch ``e = q // N``, where grain's index shuffle draws a new
permutation each epoch (no table of N entries is built, so ImageNet-sized data costs no memory
for it). Global batch ``g`` covers positions ``[gG, (g+1)G)`` and process ``p`` of ``P`` takes
rows ``[gG + pB, gG + (p+1)B)`` (``B`` per process, ``G = PB``): batches may span epochs and no
example is dropped. The horizontal flip is a coin drawn from grain's per-position random
generator (Philox keyed by the seed and the position), so it belongs to the position, not to
the example. All processes compute the same order; each decodes only its own rows.

State
-----
``get_state()`` is ``{'position', 'num_examples', 'tfds_name', 'split', 'shuffle', 'seed'}``:
the position of the next batch the caller will receive (examples of all processes), and a
fingerprint of the order. ``set_state`` refuses a state whose fingerprint differs (another data
set, version, split, order or seed), rather than silently continuing a different stream. The
position is kept instead of grain's iterator state because grain's multi-process state lists
one entry per worker process: a position survives a change of ``data.num_workers`` and of the
process count.

Workers
-------
``data.num_workers`` N > 0 starts N grain worker processes (started fresh, not forked from
the training process); each builds whole batches, decoding, scaling to [-1, 1] and flipping
there, and the batches come back through shared memory in stream order, so the stream does not
depend on N. ``num_workers`` 0 builds batches in threads of the training process (small data,
tests). Worker processes start on the first ``next_batch`` and again after a ``set_state``
that moves the position; each start costs seconds (every worker imports grain, which imports
JAX, and TFDS). Workers are spawned, so they import the caller's main module again: a script
that reads with ``num_workers`` > 0 keeps its work under ``if __name__ == '__main__':``
(``shortcut_jax.main`` does).

Preparing a data set (once; needs TensorFlow: ``pip install tensorflow-cpu``)::

    tfds build cifar10 --data_dir=DIR --file_format=array_record
    # manual downloads first, e.g. ImageNet: DIR/downloads/manual/ILSVRC2012_img_{train,val}.tar
    tfds build imagenet2012 --data_dir=DIR --file_format=array_record

Feeding other consumers: any ``Source`` built with ``data.shuffle=False`` and
``data.random_flip=False`` gives the examples in stored order, positions ``0..N-1``; that is
the seam for a command that encodes a whole data set once (e.g. images to latents): it reads
``ceil(N / B)`` batches and keeps the first N rows, knowing nothing of TFDS.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from shortcut_jax.data import config as cfg
from shortcut_jax.data.core import (
    FLIP_STREAM,
    PERMUTATION_STREAM,
    BatchLayout,
    DataSpec,
    Source,
    draw_reference_indices,
    require_state_keys,
    uint8_to_float,
)
from shortcut_jax.data.preprocess import centre_crop_resize

# Threads that build batches: inside each worker process (one keeps a process on one core,
# where Pillow's decoding runs; the next batch is built while the last one is handed over), or
# in the training process when data.num_workers is 0.
WORKER_THREADS = 1
IN_PROCESS_THREADS = 2
# Batches a worker process may hold finished beyond the one being built.
WORKER_BUFFER = 1
# Rows per task when reading an evaluation reference set.
REFERENCE_BATCH = 256
# Named in messages; the folder TFDS reads manual downloads from, below data_dir.
MANUAL_SUBDIR = os.path.join("downloads", "manual")
# Fields of get_state() that identify the stream, with the setting that changes each.
FINGERPRINT_SETTINGS = {
    "tfds_name": "data.tfds_name (data set, config and version)",
    "split": "data.split",
    "num_examples": "the data set's contents",
    "shuffle": "data.shuffle",
    "seed": "seed",
}


@dataclasses.dataclass(frozen=True)
class TfdsInfo:
    """What ``prepare_tfds`` learnt about the data set: all a ``TfdsSource`` needs to open it.

    Plain values only, so that it travels to grain's worker processes.
    """

    name: str  # data.tfds_name as given, e.g. 'celeb_a_hq/256'
    full_name: str  # name/config/version as TFDS resolved it, e.g. 'celeb_a_hq/256/2.0.0'
    data_dir: str  # data.data_dir ('' for TFDS's default)
    split: str
    num_examples: int
    image_key: str
    label_key: str | None  # None: unlabelled (data.use_labels=False)
    num_classes: int  # 0 when unlabelled
    channels: int  # 1 (grey) or 3 (RGB)
    native_size: tuple[int, int] | None  # (H, W) when every image has it, else None
    encoded: bool  # True: PNG/JPEG bytes decoded here; False: uint8 arrays as stored


# ----------------------------------------------------------------------------- preparation


def _import_tfds():
    try:
        import tensorflow_datasets  # deferred: the package imports without TFDS installed
    except ImportError as error:
        raise ValueError(
            "data.name='tfds' needs tensorflow-datasets, grain and array-record: pip install -e '.[tfds]'."
        ) from error
    return tensorflow_datasets


def _shown_data_dir(data_dir: str, tfds) -> str:
    """``data.data_dir=<this>`` in messages."""
    return repr(data_dir) if data_dir else f"'' (TFDS's default, {tfds.core.constants.DATA_DIR})"


def build_command(tfds_name: str, data_dir: str) -> str:
    """The one-time preparation command (it needs TensorFlow installed)."""
    flag = f" --data_dir={data_dir}" if data_dir else ""
    return f"tfds build {tfds_name}{flag} --file_format=array_record"


def _check_remote_dir(data_dir: str) -> None:
    """gs:// metadata is read through etils.epath: TensorFlow's file system or gcsfs."""
    if not data_dir.startswith("gs://"):
        return
    if importlib.util.find_spec("tensorflow") is None and importlib.util.find_spec("gcsfs") is None:
        raise ValueError(
            f"data.data_dir={data_dir!r} is on Google Cloud Storage; reading it without "
            "TensorFlow needs gcsfs: pip install gcsfs (or pip install -e '.[tfds]')."
        )


def _versions_on_disk(tfds, tfds_name: str, data_dir: str) -> list[str]:
    """Versions prepared under data_dir for the name without its version, e.g. ['5.0.0']."""
    from etils import epath

    base = tfds_name.split(":")[0]
    root = epath.Path(data_dir or tfds.core.constants.DATA_DIR).joinpath(*base.split("/"))
    try:
        return sorted(p.name for p in root.iterdir() if (p / "dataset_info.json").exists())
    except (OSError, ValueError):
        return []


def _version_hint(tfds, tfds_name: str, data_dir: str) -> str:
    found = _versions_on_disk(tfds, tfds_name, data_dir)
    if not found:
        return ""
    base = tfds_name.split(":")[0]
    return f" Versions prepared there: {found}; to read one, set data.tfds_name='{base}:{found[-1]}'."


def _open_builder(tfds, tfds_name: str, data_dir: str):
    """``tfds.builder`` with an error that says what to change."""
    try:
        return tfds.builder(tfds_name, data_dir=data_dir or None)
    except Exception as error:  # noqa: BLE001 - TFDS signals a bad name with several types
        shown = _shown_data_dir(data_dir, tfds)
        hint = _version_hint(tfds, tfds_name, data_dir)
        if not hint:
            base = tfds_name.split(":")[0].split("/")[0]
            close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=5)
            hint = f" Close TFDS names: {close}." if close else ""
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"data.tfds_name={tfds_name!r} cannot be opened with data.data_dir={shown} "
            f"({type(error).__name__}: {first_line}).{hint} Names look like 'cifar10', "
            "'celeb_a_hq/256' (name/config) or 'imagenet2012:5.1.0' (name:version); the "
            "catalogue is at tensorflow.org/datasets/catalog."
        ) from error


def _not_prepared_message(tfds, builder, tfds_name: str, data_dir: str) -> str:
    shown = _shown_data_dir(data_dir, tfds)
    lines = [
        f"TFDS data set {tfds_name!r} ({builder.info.full_name}) is not prepared under "
        f"data.data_dir={shown} (looked for {builder.data_dir}).",
    ]
    hint = _version_hint(tfds, tfds_name, data_dir)
    if hint:
        lines.append(hint.strip())
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    root = data_dir or tfds.core.constants.DATA_DIR
    if instructions:
        manual = os.path.join(root, MANUAL_SUBDIR)
        text = " ".join(instructions.split())
        lines.append(f"It is built from files you download yourself: put them in {manual}/ (TFDS's words: {text})")
    lines.append(
        "Prepare it once (on any machine with TensorFlow installed: pip install tensorflow-cpu), "
        f"then train without TensorFlow:\n  {build_command(tfds_name, data_dir)}"
    )
    lines.append("Or set data.data_dir to the folder where it is already prepared.")
    return "\n".join(lines)


def _check_random_access(tfds, builder, tfds_name: str, data_dir: str) -> None:
    file_format = tfds.core.file_adapters.FileFormat
    available = builder.info.available_file_formats()
    if available & set(file_format.with_random_access()):
        return
    shown = sorted(f.value for f in available)
    raise ValueError(
        f"TFDS data set {builder.info.full_name} under data.data_dir="
        f"{_shown_data_dir(data_dir, tfds)} is stored as {shown}, which has no random "
        "access; this reader needs ArrayRecord (no TensorFlow at training time, exact resume). "
        "Convert it once (needs TensorFlow):\n"
        f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record\n"
        f"or prepare it again in ArrayRecord:\n  {build_command(tfds_name, data_dir)}"
    )


def _split_sizes(builder) -> str:
    return ", ".join(f"{name} ({info.num_examples})" for name, info in builder.info.splits.items())


def _num_examples(builder, split: str) -> int:
    try:
        count = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError, AssertionError) as error:
        raise ValueError(
            f"data.split={split!r} does not exist in {builder.info.full_name}; its splits are "
            f"{_split_sizes(builder)}. Slices such as 'train[:90%]' or 'train[1000:]' and unions "
            f"('train+validation') work too. ({error})"
        ) from error
    if count == 0:
        raise ValueError(
            f"data.split={split!r} of {builder.info.full_name} holds no examples; its splits are "
            f"{_split_sizes(builder)}."
        )
    return int(count)


def _image_feature(tfds, builder, image_key: str) -> tuple[int, tuple[int, int] | None, bool]:
    """(channels, native (H, W) or None, encoded) of the image feature; raises with the keys."""
    features = builder.info.features
    keys = list(features.keys())
    image_like = [
        k
        for k in keys
        if isinstance(features[k], (tfds.features.Image, tfds.features.Tensor)) and len(features[k].shape) in (2, 3)
    ]
    if image_key not in features:
        raise ValueError(
            f"data.image_key={image_key!r} is not a feature of {builder.info.full_name}; its "
            f"features are {keys} (image-like: {image_like}). Set data.image_key to one of them."
        )
    feature = features[image_key]
    encoded = isinstance(feature, tfds.features.Image)
    shape = tuple(feature.shape)
    if not (encoded or isinstance(feature, tfds.features.Tensor)) or len(shape) not in (2, 3):
        raise ValueError(
            f"data.image_key={image_key!r} of {builder.info.full_name} is {feature!r}, not an "
            f"image; image-like features: {image_like}."
        )
    dtype = np.dtype(feature.np_dtype)
    if dtype != np.uint8:
        raise ValueError(
            f"data.image_key={image_key!r} of {builder.info.full_name} holds {dtype} images; "
            "this reader reads 8-bit images (uint8)."
        )
    channels = shape[2] if len(shape) == 3 else 1
    if channels not in (1, 3, 4, None):
        raise ValueError(
            f"data.image_key={image_key!r} of {builder.info.full_name} has {channels} channels; "
            "this reader reads grey (1), RGB (3) or RGBA (4, read as RGB) images."
        )
    channels = 1 if channels == 1 else 3
    height, width = shape[0], shape[1]
    native = (int(height), int(width)) if height and width else None
    return channels, native, encoded


def _label_feature(tfds, builder, label_key: str) -> int:
    """num_classes of the ClassLabel feature ``label_key``; raises with the keys."""
    features = builder.info.features
    class_labels = [k for k in features.keys() if isinstance(features[k], tfds.features.ClassLabel)]
    if label_key not in features:
        raise ValueError(
            f"data.label_key={label_key!r} is not a feature of {builder.info.full_name}; its "
            f"features are {list(features.keys())} (class labels: {class_labels}). Set "
            "data.label_key to one of them, or data.use_labels=False to train unconditionally."
        )
    feature = features[label_key]
    if not isinstance(feature, tfds.features.ClassLabel) or not feature.num_classes:
        raise ValueError(
            f"data.label_key={label_key!r} of {builder.info.full_name} is {feature!r}, not a "
            f"class label with a known number of classes (class labels: {class_labels}); set "
            "data.label_key to one of those, or data.use_labels=False."
        )
    return int(feature.num_classes)


def prepare_tfds(config, name: str) -> TfdsInfo:
    """Checks the config and the prepared data set (metadata only; no example is read)."""
    if cfg.get(config, "path"):
        raise ValueError(
            f"data.path={cfg.get(config, 'path')!r} is set but data.name='tfds' reads "
            "data.tfds_name from data.data_dir; set data.path=''."
        )
    cfg.reject_cache_decoded(config, name)
    tfds_name = cfg.get(config, "tfds_name").strip()
    if not tfds_name:
        raise ValueError(
            "data.name='tfds' needs data.tfds_name, e.g. 'cifar10', 'mnist', 'celeb_a_hq/256' "
            "or 'imagenet2012' (and data.data_dir where it is prepared)."
        )
    data_dir = cfg.get(config, "data_dir")
    split = cfg.get(config, "split")
    image_key, label_key = cfg.get(config, "image_key"), cfg.get(config, "label_key")
    use_labels, image_size = cfg.get(config, "use_labels"), cfg.get(config, "image_size")
    tfds = _import_tfds()
    _check_remote_dir(data_dir)
    builder = _open_builder(tfds, tfds_name, data_dir)
    if not builder.is_prepared():
        raise ValueError(_not_prepared_message(tfds, builder, tfds_name, data_dir))
    _check_random_access(tfds, builder, tfds_name, data_dir)
    num_examples = _num_examples(builder, split)
    channels, native, encoded = _image_feature(tfds, builder, image_key)
    if image_size == 0 and native is None:
        raise ValueError(
            f"images of {builder.info.full_name} ({image_key!r}) differ in size; "
            "data.image_size=0 keeps native sizes, which must then all be equal. Set "
            "data.image_size (e.g. 256) to centre-crop and resize every image to that square."
        )
    num_classes = _label_feature(tfds, builder, label_key) if use_labels else 0
    return TfdsInfo(
        name=tfds_name,
        full_name=builder.info.full_name,
        data_dir=data_dir,
        split=split,
        num_examples=num_examples,
        image_key=image_key,
        label_key=label_key if use_labels else None,
        num_classes=num_classes,
        channels=channels,
        native_size=native,
        encoded=encoded,
    )


def open_records(info: TfdsInfo):
    """The split as a random-access sequence of feature dicts, image features left encoded."""
    tfds = _import_tfds()
    builder = tfds.builder(info.name, data_dir=info.data_dir or None)
    decoders = {info.image_key: tfds.decode.SkipDecoding()} if info.encoded else None
    return builder.as_data_source(split=info.split, decoders=decoders)


# ----------------------------------------------------------------------------- per-example work


@dataclasses.dataclass(frozen=True)
class ExampleToPixels:
    """One TFDS example -> ``{'image': uint8 [H, W, C], 'label': int32}``, optionally flipped.

    A plain picklable object: grain sends it to the worker processes.
    """

    image_key: str
    label_key: str | None
    channels: int
    image_size: int
    shape: tuple[int, int, int]
    encoded: bool

    def pixels(self, value: Any) -> np.ndarray:
        mode = "L" if self.channels == 1 else "RGB"
        if self.encoded:
            with Image.open(io.BytesIO(value)) as opened:
                opened.load()
                image = opened if opened.mode == mode else opened.convert(mode)
        else:
            array = np.asarray(value, dtype=np.uint8)
            if self.image_size == 0 and array.shape == self.shape:
                return array  # stored decoded at the wanted size: nothing to do
            if array.ndim == 3 and self.channels == 1:
                array = array[..., 0]
            image = Image.fromarray(array)
            if image.mode != mode:
                image = image.convert(mode)
        pixels = centre_crop_resize(image, self.image_size)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.shape != self.shape:
            raise RuntimeError(
                f"an image of feature {self.image_key!r} has shape {pixels.shape}, expected "
                f"{self.shape}; set data.image_size > 0 to resize every image."
            )
        return pixels

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        pixels = self.pixels(example[self.image_key])
        if rng is not None and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        label = 0 if self.label_key is None else int(example[self.label_key])
        return {"image": pixels, "label": np.int32(label)}


def to_model_batch(batch: dict) -> dict:
    """Stacked uint8 images and labels -> the batch the model reads (scaled in the worker)."""
    return {"x": uint8_to_float(np.asarray(batch["image"])), "label": np.asarray(batch["label"], dtype=np.int32)}


class _Gather(Sequence):
    """``records`` at ``indices``, as a random-access source (for reference sets)."""

    def __init__(self, records, indices: np.ndarray):
        self._records = records
        self._indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        return self._records[self._indices[i]]


def _derived_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for grain, distinct per stream; seeds s and s+1 share no epoch order
    (grain's shuffle seeds epoch e with seed + e)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


# ----------------------------------------------------------------------------- the source


class TfdsSource(Source):
    """Streams a prepared TFDS split (see the module docstring)."""

    def __init__(
        self,
        records,
        info: TfdsInfo,
        *,
        layout: BatchLayout,
        seed: int,
        shuffle: bool = True,
        random_flip: bool = False,
        image_size: int = 0,
        num_workers: int = 0,
    ):
        self.info = info
        size = (image_size, image_size) if image_size else info.native_size
        self.spec = DataSpec(shape=(*size, info.channels), num_classes=info.num_classes, kind="images")
        self.num_examples = len(records)
        if self.num_examples != info.num_examples:
            raise ValueError(
                f"{info.full_name} split {info.split!r} reads {self.num_examples} examples but "
                f"its metadata says {info.num_examples}; prepare the data set again."
            )
        self._records = records
        self._layout = layout
        self._seed = seed
        self._shuffle = shuffle
        self._random_flip = random_flip
        self._num_workers = num_workers
        self._to_pixels = ExampleToPixels(
            info.image_key, info.label_key, info.channels, image_size, self.spec.shape, info.encoded
        )
        self._position = 0
        self._iterator = None  # started by the first next_batch, at self._position
        self._closed = False

    # The stream ---------------------------------------------------------------------------

    def _batches(self, start: int):
        """grain MapDataset: element k is this process's batch at position start + k * G."""
        import grain

        examples = grain.MapDataset.source(self._records)
        if self._shuffle:
            examples = examples.shuffle(seed=_derived_seed(self._seed, PERMUTATION_STREAM))
        stream = examples.repeat()  # endless; a shuffled source is reshuffled every epoch
        if self._random_flip:
            # The generator handed to the map is keyed by the position in `stream`.
            stream = stream.random_map(self._to_pixels, seed=_derived_seed(self._seed, FLIP_STREAM))
        else:
            stream = stream.map(self._to_pixels)
        rows = stream[start + self._layout.offset :]
        # Consecutive groups of B rows; this process takes every P-th one.
        batches = rows.batch(self._layout.batch_size)[:: self._layout.process_count]
        return batches.map(to_model_batch)

    def _iterate(self, batches):
        import grain

        if self._num_workers == 0:
            return iter(
                batches.to_iter_dataset(
                    grain.ReadOptions(num_threads=IN_PROCESS_THREADS, prefetch_buffer_size=IN_PROCESS_THREADS)
                )
            )
        _allow_unparsed_flags()
        dataset = batches.to_iter_dataset(
            grain.ReadOptions(num_threads=WORKER_THREADS, prefetch_buffer_size=WORKER_THREADS)
        )
        # Each worker process takes every N-th batch; grain returns them in order.
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self._num_workers, per_worker_buffer_size=WORKER_BUFFER)
        )
        return iter(dataset)

    def next_batch(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("next_batch() called after close().")
        if self._iterator is None:
            self._iterator = self._iterate(self._batches(self._position))
        batch = next(self._iterator)  # an error leaves the position on the failed batch
        self._position += self._layout.global_batch_size
        return {"x": np.asarray(batch["x"]), "label": np.asarray(batch["label"])}

    # Resume -------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "tfds_name": self.info.full_name,
            "split": self.info.split,
            "num_examples": int(self.num_examples),
            "shuffle": bool(self._shuffle),
            "seed": int(self._seed),
        }

    def get_state(self) -> dict[str, Any]:
        return {"position": int(self._position), **self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        require_state_keys(state, ("position",), type(self).__name__)
        expected = self._fingerprint()
        missing = [key for key in expected if key not in state]
        if missing:
            raise ValueError(
                f"the saved data position {dict(state)} was not written by the TFDS reader "
                f"(it lacks {missing}): the checkpoint comes from a run with another data.name. "
                "Resume with that run's data settings, or train in a new workdir."
            )
        differ = [key for key in expected if state[key] != expected[key]]
        if differ:
            listed = "; ".join(f"{FINGERPRINT_SETTINGS[k]}: saved {state[k]!r}, now {expected[k]!r}" for k in differ)
            raise ValueError(
                f"the saved data position belongs to another stream ({listed}); continuing "
                "would silently read a different order. Set these back to the saved run's "
                "values, or train in a new workdir."
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"state position must be >= 0, got {position}.")
        if position != self._position:
            self._stop()
            self._position = position

    # Evaluation and cleanup ---------------------------------------------------------------

    def reference(self, n: int, seed: int) -> np.ndarray:
        """``n`` distinct examples (all if ``n >= N``) chosen by ``seed``, unflipped, float32."""
        import grain

        if self._closed:
            raise RuntimeError("reference() called after close().")
        indices = draw_reference_indices(self.num_examples, n, seed)
        out = np.empty((len(indices), *self.spec.shape), dtype=np.float32)
        if len(indices) == 0:
            return out
        batches = (
            grain.MapDataset.source(_Gather(self._records, indices))
            .map(self._to_pixels)
            .batch(REFERENCE_BATCH)
            .map(to_model_batch)
        )
        start = 0
        iterator = self._iterate(batches)
        try:
            for batch in iterator:
                out[start : start + len(batch["x"])] = batch["x"]
                start += len(batch["x"])
        finally:
            _close(iterator)
        return out

    def _stop(self) -> None:
        if self._iterator is not None:
            _close(self._iterator)
            self._iterator = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stop()


def _allow_unparsed_flags() -> None:
    """grain's worker processes read absl flags (with their defaults). ``shortcut_jax.main``
    parses them; scripts and tests that never do would fail there, so the defaults are declared
    parsed. Flags already parsed are left alone."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _close(iterator) -> None:
    """Stops grain's threads or worker processes behind ``iterator``."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def build_tfds(config, info: TfdsInfo, layout: BatchLayout, seed: int) -> TfdsSource:
    return TfdsSource(
        open_records(info),
        info,
        layout=layout,
        seed=seed,
        shuffle=cfg.get(config, "shuffle"),
        random_flip=cfg.get(config, "random_flip"),
        image_size=cfg.get(config, "image_size"),
        num_workers=cfg.get(config, "num_workers"),
    )
