"""The project notebooks: committed without outputs, and executed headless on a tiny dataset."""
from __future__ import annotations

import json

import pytest

from opdcells.notebooks import NOTEBOOKS, REPO, execute_notebook, inject_parameters
from tests.helpers import tiny_dataset, write_exports


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs_and_has_a_parameters_cell(name):
    nb = json.loads((REPO / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "QUICK" in "".join(tagged[0]["source"])


def test_injected_parameters_follow_the_parameters_cell():
    import nbformat

    nb = nbformat.read(REPO / "Final_Project.ipynb", as_version=4)
    position = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    inject_parameters(nb, {"EPOCHS": 3, "MODELS": ["features"]})
    injected = nb.cells[position + 1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert "EPOCHS = 3" in injected.source and "MODELS = ['features']" in injected.source


@pytest.mark.slow
def test_final_project_notebook_runs_headless_on_a_tiny_dataset(tmp_path_factory, tmp_path):
    data = tiny_dataset(tmp_path_factory)
    write_exports(tmp_path / "exports", per_class=1)
    params = {"QUICK": True, "EPOCHS": 1, "INPUT_SIZE": 32, "DATA_PATH": str(data), "WEIGHTS": "none",
              "SAVED_MODELS": str(tmp_path / "saved_models"), "RESULTS": str(tmp_path / "results"),
              "EXPORTS_TO_PREDICT": str(tmp_path / "exports")}
    out = execute_notebook(REPO / "Final_Project.ipynb", params, output_dir=tmp_path / "executed", cwd=REPO)
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    results = tmp_path / "results" / "final_project"
    for model in ("features", "mobilenetv2", "resnet50", "vgg16"):
        assert (tmp_path / "saved_models" / f"final_project_{model}_five_class" / "config.json").is_file()
        assert (results / f"{model}_five_class" / "confusion_matrix.png").stat().st_size > 0
    table = (results / "comparison.csv").read_text().splitlines()
    assert len(table) == 1 + 4 + 2 and "accuracy_ci_low" in table[0]   # the models and the 2 baselines
    assert (results / "accuracy.png").stat().st_size > 0
    assert (results / "predictions_new_exports.csv").read_text().count("\n") >= 2
