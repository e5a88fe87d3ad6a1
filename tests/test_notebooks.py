"""The project notebooks: committed without outputs, and executed headless on a tiny dataset."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from opdcells import cli
from opdcells.notebooks import NOTEBOOKS, REPO, execute_notebook
from tests.helpers import tiny_dataset, write_exports


def tiny_notebook(path, fail: bool = False):
    """A two-cell notebook: a ``parameters`` cell (the command line's, X, FAIL) and a cell that prints
    X * 2 or fails."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cli_names = ("QUICK", "DATA_PATH", "SEED", "SAVED_MODELS", "RESULTS")   # defined by the real notebooks
    cli_parameters = "".join(f"{name} = ''\n" for name in cli_names)
    parameters = nbformat.v4.new_code_cell(f"{cli_parameters}X = 1\nFAIL = {fail}")
    parameters.metadata["tags"] = ["parameters"]
    work = nbformat.v4.new_code_cell("import os, opdcells\nassert not FAIL, 'asked to fail'\n"
                                     "print(X * 2, os.environ['TF_CPP_MIN_LOG_LEVEL'], opdcells.__file__)")
    nb.cells = [parameters, work]
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs_and_has_a_parameters_cell(name):
    nb = json.loads((REPO / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "QUICK" in "".join(tagged[0]["source"])


def kernels_running() -> list[int]:
    """Process ids of this process's children that run an ipykernel."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [int(pid) for pid in children if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_parameters_are_injected_after_the_parameters_cell_and_the_copy_is_written(tmp_path):
    import nbformat

    out = execute_notebook(tiny_notebook(tmp_path / "t.ipynb"), {"X": 21}, output_dir=tmp_path / "executed")
    assert not kernels_running(), "the kernel is shut down after the run"
    assert out == tmp_path / "executed" / "t.ipynb" and not list((tmp_path / "executed").glob(".*"))
    cells = nbformat.read(out, as_version=4).cells
    assert [c.metadata.get("tags") for c in cells[:2]] == [["parameters"], ["injected-parameters"]]
    assert "X = 21" in cells[1].source
    printed = cells[2].outputs[0]["text"].split()
    assert printed[:2] == ["42", "2"], "the parameter reached the kernel, TensorFlow's start-up lines are off"
    assert printed[2] == str(REPO / "opdcells" / "__init__.py")


def test_a_failing_cell_is_one_line_naming_notebook_and_cell_and_exit_2(tmp_path, capsys):
    notebook = tiny_notebook(tmp_path / "t.ipynb", fail=True)
    status = cli.main(["notebooks", str(notebook), "--results", str(tmp_path / "results"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {notebook}: cell In [3] failed: AssertionError: asked to fail")
    executed = (tmp_path / "results" / "notebooks" / "t.ipynb").read_text()
    assert "asked to fail" in executed, "the executed copy, with the error, is kept"


#: The notebook's models in its test: the features baseline and one CNN, VGG16, the family the other
#: notebook's test does not train (it trains MobileNetV2, OPD-pretrained MobileNetV2 and DINOv2). Every cell
#: loops over MODELS; each family's own code (build, ImageNet scaling, save and reload) is tested in
#: test_models.py, and ResNet50, the costliest graph to trace, in test_models.py only.
FINAL_PROJECT_MODELS = ["features", "vgg16"]


@pytest.mark.slow
def test_final_project_notebook_runs_headless_on_a_tiny_dataset(tmp_path_factory, tmp_path):
    data = tiny_dataset(tmp_path_factory)
    write_exports(tmp_path / "exports", per_class=1)
    params = {"QUICK": True, "EPOCHS": 1, "INPUT_SIZE": 32, "DATA_PATH": str(data), "INITS": ["random"],
              "MODELS": FINAL_PROJECT_MODELS,
              "SAVED_MODELS": str(tmp_path / "saved_models"), "RESULTS": str(tmp_path / "results"),
              "EXPORTS_TO_PREDICT": str(tmp_path / "exports")}
    out = execute_notebook(REPO / "Final_Project.ipynb", params, output_dir=tmp_path / "executed", cwd=REPO)
    executed = json.loads(out.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    tags = [c.get("metadata", {}).get("tags", []) for c in executed["cells"]]
    assert tags[tags.index(["parameters"]) + 1] == ["injected-parameters"]
    results = tmp_path / "results" / "final_project"
    for model in FINAL_PROJECT_MODELS:
        assert (tmp_path / "saved_models" / f"final_project_{model}_five_class" / "config.json").is_file()
        assert (results / f"{model}_five_class" / "confusion_matrix.png").stat().st_size > 0
    table = (results / "comparison.csv").read_text().splitlines()
    # + the fused vgg16's deep part alone (TrainConfig.fusion), + 2 baselines
    assert len(table) == 1 + len(FINAL_PROJECT_MODELS) + 1 + 2 and "accuracy_ci_low" in table[0]
    assert (results / "accuracy.png").stat().st_size > 0
    assert (results / "predictions_new_exports.csv").read_text().count("\n") >= 2


def comparison_rows(rows):
    """A made-up comparison table: (model, init, balanced accuracy, CI low, CI high, predicts_only)."""
    import pandas as pd

    return pd.DataFrame([{"task": "five_class", "model": m, "init": i, "balanced_accuracy": v,
                          "balanced_accuracy_ci_low": lo, "balanced_accuracy_ci_high": hi,
                          "predicts_only": only}
                         for m, i, v, lo, hi, only in rows])


MAJORITY = ("majority class", "baseline", 0.2, 0.2, 0.2, "SW480")


def test_conclusion_names_the_winner_its_ci_the_baselines_and_the_initialisations():
    from opdcells.study.experiments import conclusion

    text = conclusion(comparison_rows([
        ("features", "random", 0.85, 0.80, 0.90, ""),
        ("mobilenetv2", "random", 0.20, 0.20, 0.20, "SW480"),
        ("opd_mobilenetv2", "opd:opd_mobilenetv2_pretrained", 0.91, 0.86, 0.95, ""), MAJORITY]))
    assert "**opd_mobilenetv2** has the best balanced accuracy on unseen groups, 0.910 [0.860, 0.950]" in text
    assert "beats the features baseline (OPD morphology + boosting, 0.850)" in text
    assert ("mobilenetv2 is no better than always answering the majority class (balanced accuracy 0.200)"
            in text)
    assert "mobilenetv2 predicts SW480 for every map" in text
    assert "collapse" not in text and "majority class predicts" not in text    # baselines are not models
    assert "opd_mobilenetv2 `opd:opd_mobilenetv2_pretrained`, mobilenetv2 `random`" in text
    assert "features `" not in text                                            # no initialisation to name
    assert "runner-up" not in text                                             # 0.85 is below the CI


def test_conclusion_on_ties_and_overlapping_intervals():
    from opdcells.study.experiments import conclusion

    tie = conclusion(comparison_rows([("features", "random", 0.80, 0.7, 0.9, ""),
                                      ("resnet50", "imagenet", 0.80, 0.7, 0.9, ""),
                                      ("vgg16", "random", 0.80, 0.7, 0.9, ""), MAJORITY]),
                     initialisations=False)
    assert "features, resnet50 and vgg16 tie for the best balanced accuracy on unseen groups (0.800)" in tie
    assert "Initialisation" not in tie
    assert "does not beat the features baseline" in tie and "no better than" not in tie
    close = conclusion(comparison_rows([("features", "random", 0.78, 0.7, 0.85, ""),
                                        ("vgg16", "random", 0.82, 0.75, 0.9, ""), MAJORITY]))
    assert "**vgg16** has the best" in close
    assert "The runner-up features (0.780) lies inside its 95% CI" in close
    assert "is above, but within the 95% CI of, the features baseline" in close
    below = conclusion(comparison_rows([("features", "random", 0.9, 0.85, 0.95, ""),
                                        ("vgg16", "random", 0.15, 0.1, 0.2, "PBMC"), MAJORITY]))
    assert "**features** has the best" in below and "vgg16 (0.150), is below the features baseline" in below
    assert "vgg16 is no better than always answering the majority class" in below
    assert "vgg16 predicts PBMC for every map" in below


def test_conclusion_needs_the_metric_column():
    from opdcells.study.experiments import conclusion

    with pytest.raises(KeyError, match="the table has no column balanced_accuracy"):
        conclusion(comparison_rows([MAJORITY]).drop(columns="balanced_accuracy"))


def test_a_run_both_notebooks_make_is_trained_once(tmp_path_factory, tmp_path, monkeypatch):
    """compare_models re-uses a run with the same settings, dataset, split and code (the features run of
    both notebooks, every run of a second demo) and trains one whose settings differ."""
    import opdcells.train
    from opdcells.study import experiments

    data = tiny_dataset(tmp_path_factory)
    kw = {"saved_models": tmp_path / "saved", "results": tmp_path / "results", "n_boot": 20}
    first = experiments.compare_models(data, ["features"], ["five_class"], name="one", **kw)
    trained = []
    real_train = opdcells.train.train
    monkeypatch.setattr(opdcells.train, "train", lambda *a, **k: trained.append(a) or real_train(*a, **k))
    second = experiments.compare_models(data, ["features"], ["five_class"], name="two", epochs=None, **kw)
    assert not trained
    run = second.runs[("five_class", "features")]
    assert run.model_dir == first.runs[("five_class", "features")].model_dir
    assert second.table.loc[0, "accuracy"] == first.table.loc[0, "accuracy"]
    assert (tmp_path / "results" / "two" / "features_five_class" / "confusion_matrix.png").is_file()
    experiments.compare_models(data, ["features"], ["five_class"], name="three", epochs=5, **kw)
    assert len(trained) == 1                                   # other settings: another run
