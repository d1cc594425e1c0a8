"""The notebooks run headless with small settings (so they never rot) and define no core logic."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = os.path.join(os.path.dirname(HERE), "notebooks")

pytestmark = pytest.mark.timeout(400)


def execute(name, tmp_path):
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def outputs_of(notebook, kind):
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == kind]


def test_train_live_notebook_runs_and_shows_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("ASYNCSGD_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("ASYNCSGD_NOTEBOOK_OUT", str(out))
    notebook = execute("train_live.ipynb", tmp_path)
    assert not outputs_of(notebook, "error")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["trainer"] == "pdasgd"
    images = [o for o in outputs_of(notebook, "display_data") + outputs_of(notebook, "execute_result")
              if "image/png" in o.get("data", {})]
    assert images, "the live plots were not drawn"


def test_compare_notebook_reads_experiment_results(tmp_path, monkeypatch, tiny_data):
    from asyncsgd.config import TrainConfig
    from asyncsgd.sweep import Arm, experiment_parser, finish, run_arms
    results = tmp_path / "results"
    args = experiment_parser("tiny", "tiny").parse_args(["--seeds", "1", "--out", str(results / "tiny")])
    base = TrainConfig(model="mlp", dataset="synthetic", batch_size=32, lr=0.02, progress=False)
    arms = [Arm(t, TrainConfig(**{**base.to_dict(), "trainer": t})) for t in ("sync", "pdasgd")]
    finish(args, run_arms(arms, 1, args.out, dataset=tiny_data), "tiny")
    monkeypatch.setenv("ASYNCSGD_RESULTS", str(results))
    notebook = execute("compare_results.ipynb", tmp_path)
    assert not outputs_of(notebook, "error")
    text = json.dumps([o for o in outputs_of(notebook, "display_data") + outputs_of(notebook, "stream")])
    assert "tiny" in text and "pdasgd" in text and "image/png" in text


def test_notebooks_define_no_core_logic():
    for name in ("train_live.ipynb", "compare_results.ipynb"):
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        source = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
        assert "import asyncsgd" in source or "from asyncsgd" in source
        assert "jax.jit" not in source and "class " not in source  # training logic lives in the library
