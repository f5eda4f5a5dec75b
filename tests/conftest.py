"""Shared test setup: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

COMPILE_CACHE = os.environ.get(
    "SHORTCUT_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax_tests")
)
# the cache settings, as JAX reads them from the environment (child processes get them too)
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def child_env(**overrides) -> dict:
    """The environment for a child process the tests start: this process's, with the tests'
    persistent compilation cache (directory and thresholds), then ``overrides``."""
    return {**os.environ, **CACHE_ENV, **overrides}


SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def write_tar(path, files):
    """A .tar.gz at ``path`` holding ``files`` ({name in the archive: bytes})."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def toy2d_config(arg: str = "runlocal=True", **overrides):
    """``experiments/toy2d.py:<arg>`` as ``--config`` reads it, quiet (no progress bar,
    TensorBoard or asynchronous checkpoints), with ``{"section.key": value}`` overrides."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("toy2d", os.path.join(root, "experiments", "toy2d.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.train.progress_bar, config.train.use_tensorboard, config.train.async_ckpt = False, False, False
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config
