"""notebooks/shortcut_colab.ipynb runs headlessly (nbclient) on a checkpoint this test trains: it
loads the run, shows samples at each budget and the metric against the budget."""

import json
import math
import os

import nbformat
from nbclient import NotebookClient

from shortcut_jax import sample
from shortcut_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "shortcut_colab.ipynb")
TOY2D = os.path.join(ROOT, "experiments", "toy2d.py")


def with_parameters(notebook, **values):
    """The notebook with a cell setting ``values`` right after its cell tagged 'parameters'
    (what papermill injects)."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


def test_notebook_shows_samples_at_each_budget_and_the_metric_against_the_budget(tmp_path, monkeypatch):
    workdir = str(tmp_path / "toy")
    config = sample.load_config(
        f"{TOY2D}:runlocal=True",
        {
            "train.progress_bar": False,
            "train.use_tensorboard": False,
            "train.async_ckpt": False,
            "eval.num_samples": 200,
            "eval.batch_size": 200,
        },
    )
    loop.train_and_evaluate(config, workdir)
    out_dir = str(tmp_path / "notebook_eval")
    notebook = with_parameters(
        nbformat.read(NOTEBOOK, as_version=4),
        CONFIG="experiments/toy2d.py:runlocal=True",  # relative to the repository root, as README gives it
        WORKDIR=workdir,
        BUDGETS=[1, 4],
        NUM_IMAGES=256,
        METRIC_SAMPLES=300,
        OUT_DIR=out_dir,
    )
    # The kernel imports this checkout of the package, on one CPU device, with the tests' compiled programs.
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv(
        "JAX_COMPILATION_CACHE_DIR",
        os.environ.get(
            "SHORTCUT_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "shortcut_jax_tests")
        ),
    )
    NotebookClient(
        # the kernel runs in notebooks/, as `jupyter nbconvert --execute` and Jupyter start it
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    ).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "shortcut_jax is installed" in text  # the install cell skipped pip
    assert "checkpoint step 20: samples of shape (2,), 0 classes, budgets up to 128 steps" in text
    pictures = [
        out
        for out in outputs
        if out.output_type in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    ]
    assert len(pictures) == 2  # the samples at both budgets in one figure, and the metric plot
    table = json.load(open(os.path.join(out_dir, "distance_by_budget.json")))
    assert [row["steps"] for row in table["rows"]] == [1, 4]
    assert all(math.isfinite(row["sliced wasserstein"]) and row["sliced wasserstein"] > 0 for row in table["rows"])
    assert json.load(open(os.path.join(out_dir, "evaluation.json")))["num_samples"] == 300
    markdown = [out for out in outputs if "text/markdown" in out.get("data", {})]
    assert markdown and "| steps | sliced wasserstein |" in markdown[0]["data"]["text/markdown"]


def test_every_injected_name_is_a_parameter_of_the_notebook():
    """An injected name that the notebook does not read would leave its default in use unnoticed."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1
    defined = {line.split(" = ")[0] for line in cells[0].source.splitlines() if " = " in line}
    assert {"CONFIG", "WORKDIR", "BUDGETS", "NUM_IMAGES", "METRIC_SAMPLES", "OUT_DIR"} <= defined
