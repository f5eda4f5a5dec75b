"""Command: FID reference statistics of a data set or an ADM .npz, or the FID of an ADM sample
file against reference statistics (the work is ``evaluation.fid.run_command``)::

    python -m shortcut_jax.fid_stats --stats --data.name=image_folder \\
        --data.path=/data/celebahq256 --data.image_size=256 --out=celebahq256_fid_stats.npz
    python -m shortcut_jax.fid_stats --samples=samples.npz --reference=celebahq256_fid_stats.npz
"""

from __future__ import annotations

from shortcut_jax.evaluation.fid import run_command


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    from shortcut_jax.data import default_data_config

    flags.DEFINE_bool("stats", False, "Compute reference statistics (of --data.* or --adm_npz).")
    flags.DEFINE_string("out", "", "Where --stats writes the statistics (.npz).")
    flags.DEFINE_string("source", "", "Name of the data set recorded in the statistics (default: data.name:data.path).")
    flags.DEFINE_string("adm_npz", "", "Images from an ADM .npz (arr_0) instead of --data.*.")
    flags.DEFINE_integer("num_images", 0, "Use the first N images (0: all).")
    flags.DEFINE_string("samples", "", "An ADM sample .npz to score against --reference.")
    flags.DEFINE_string(
        "reference", "", "Reference statistics (.npz of this project, an ADM reference batch, or a mu/sigma file)."
    )
    flags.DEFINE_string("reference_source", "", "Declare the source of a reference file that does not record it.")
    flags.DEFINE_string(
        "weights",
        "",
        "FID Inception weights (.pth or converted .npz); default: see shortcut_jax.evaluation.inception.find_weights.",
    )
    flags.DEFINE_integer("batch_size", 200, "Images per feature-extraction chunk.")
    config_flags.DEFINE_config_dict(
        "data",
        default_data_config(),
        "Data to compute statistics of (--data.name, --data.path, --data.image_size, ...).",
    )
    return flags.FLAGS


if __name__ == "__main__":
    from shortcut_jax.infra import cli

    cli.run_flags(_define_flags(), lambda fv: print(run_command(fv, fv.data)), names=("data",))
