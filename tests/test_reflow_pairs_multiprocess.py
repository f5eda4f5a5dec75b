"""Stage one of reflow in a job of two CPU processes: process 0 alone writes the files, and
neither returns before they exist (marker ``multiprocess``: ``pytest -m multiprocess``)."""

import os
import sys

import pytest

from tests.test_multiprocess import free_port, process_env, run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pairs_job(args) -> None:
    """One process: join the job, write pairs from a stand-in sampler that, like
    ``Sampler.to_host``, gives every process the whole batch, then check the files and a refusal."""
    port, process_id, out_dir = args
    from shortcut_jax.infra import distributed

    distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id), timeout_s=120)
    import numpy as np

    from shortcut_jax.data import pairs as pairs_io

    opened, real_savez = [], np.savez

    def spy_savez(path, **arrays):  # which process writes a shard (this process's numpy only)
        opened.append(path)
        real_savez(path, **arrays)

    np.savez = spy_savez
    settings = dict(
        out_dir=out_dir, shape=(3,), num_classes=2, num_pairs=10, num_steps=1, seed=0, shard_size=4, batch_size=4
    )
    manifest = pairs_io.generate_pairs(lambda params, noise, labels, **kw: 2 * noise, None, **settings)
    # on return the files are complete, whichever process wrote them
    pairs = pairs_io.load_pairs(out_dir)
    assert manifest["num_pairs"] == 10 and pairs["x"].shape == (10, 3)
    np.testing.assert_array_equal(pairs["x"], 2 * pairs["noise"])
    assert bool(opened) == (int(process_id) == 0), opened
    try:
        pairs_io.generate_pairs(lambda params, noise, labels, **kw: noise, None, **dict(settings, seed=1))
    except ValueError as err:
        assert "other settings" in str(err), err
    else:
        raise AssertionError("other settings were not refused")
    print("process", process_id, "ok", flush=True)


@pytest.mark.multiprocess
def test_two_processes_write_the_pairs_once_and_return_after_them(tmp_path):
    port, out_dir = free_port(), str(tmp_path / "pairs")
    code = "import sys; from tests.test_reflow_pairs_multiprocess import pairs_job; pairs_job(sys.argv[1:])"
    commands = [[sys.executable, "-c", code, str(port), str(i), out_dir] for i in range(2)]
    assert run_job(commands, process_env(1), tmp_path, timeout_s=120) == [0, 0]
    assert sorted(os.listdir(out_dir)) == ["manifest.json", "pairs_00000.npz", "pairs_00001.npz", "pairs_00002.npz"]
