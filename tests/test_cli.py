"""python -m opdcells COMMAND: run through cli.main, errors as one line, exit 2; quiet TensorFlow."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO_ROOT, tiny_dataset, tiny_run, write_exports, write_tiny_dataset

import load_data
from opdcells.cli import main
from opdcells.console import TENSORFLOW_NOISE, captured_stderr, drop_noise
from opdcells.predict import OOD_COLUMNS, csv_columns, dropped_path

pytest.importorskip("tensorflow")


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def features_run(tmp_path_factory):
    """A features model trained through the CLI (fast: no deep learning)."""
    data = tiny_dataset(tmp_path_factory)
    out = tmp_path_factory.mktemp("cli_runs") / "feat"
    assert main(["train", "--data", str(data), "--model", "features", "--task", "cancer_vs_blood",
                 "--out", str(out), "--n-boot", "20", "-q"]) == 0
    return data, out


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("simulate", "load", "train", "evaluate", "predict", "pretrain", "notebooks"):
        assert command in text


@pytest.mark.parametrize(("extra", "status"), [([], 1), (["--strict"], 2), (["--plausible", "nope=1:2"], 2)])
def test_load_command_does_what_load_data_py_does(extra, status, tmp_path, capsys):
    """Same exit status and messages: a bad file skipped (1), a --strict stop (2), a bad option (2)."""
    paths = write_exports(tmp_path / "src", per_class=1)
    (tmp_path / "src" / "bad.npy").write_bytes(b"not an array")
    sources = [*map(str, paths), str(tmp_path / "src" / "bad.npy")]
    statuses, messages = [], []
    for name, run in (("a", load_data.main), ("b", lambda argv: main(["load", *argv]))):
        statuses.append(run([*sources, "--label", "X", "--out", str(tmp_path / f"{name}.h5"), *extra]))
        messages.append(capsys.readouterr().err.replace(str(tmp_path / name), "OUT"))
    assert statuses == [status, status]
    assert messages[0] == messages[1] and messages[0].strip()


def test_tensorflow_start_up_lines_are_dropped_and_others_kept():
    start_up = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795992420.089401   20377 port.cc:153] oneDNN custom operations are on. You may see ...
I0000 00:00:1795992420.089800   20377 cudart_stub.cc:31] Could not find cuda drivers on your machine.
E0000 00:00:1795992424.933321   20377 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error (303)
E0000 00:00:1795992424.933321   20377 some_kernel.cc:12] Out of memory while allocating 4 GiB"""
    assert drop_noise(start_up) == [start_up.splitlines()[-1]]


def test_train_command_imports_tensorflow_without_its_start_up_lines():
    code = ("import logging; from opdcells.console import import_tensorflow, setup_logging; setup_logging(); "
            "tf = import_tensorflow(); tf.constant(1.0) + 1; logging.getLogger('absl').warning('x')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert not TENSORFLOW_NOISE.search(done.stderr) and "0000 00:00" not in done.stderr, done.stderr
    assert done.stderr == "", done.stderr


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "opdcells", "predict", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--pixel-size-um" in done.stdout


def test_simulate(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--n-per-class", "1", "--sessions-per-class", "1", "-q"]) == 0
    assert (out / "truth.csv").is_file()
    truth = pd.read_csv(out / "truth.csv")
    assert len(truth) == 5 and truth["class"].nunique() == 5
    assert str(out) in capsys.readouterr().out


def test_train_writes_the_model_folder_and_prints_the_report(features_run, capsys):
    _, out = features_run
    for name in ("model.skops", "config.json", "history.csv", "metrics.json", "split.json"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["task"] == "cancer_vs_blood"


def test_evaluate_writes_metrics_and_figures(features_run, tmp_path, capsys):
    data, out = features_run
    argv = ["evaluate", str(out), "--data", str(data), "--results", str(tmp_path), "--n-boot", "20"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sens. @ FPR 1%" in printed and "sens. @ FPR 0.1%" in printed and "(positive: cancer)" in printed
    folder = tmp_path / out.name
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "training_curves.png",
                 "gallery.png"):
        assert (folder / name).is_file(), name
    metrics = json.loads((folder / "metrics.json").read_text())
    stored = json.loads((out / "metrics.json").read_text())
    assert metrics["confusion_matrix"] == stored["confusion_matrix"]
    assert metrics["sensitivity_at_fpr"]["positive_class"] == "cancer"


def test_evaluate_shows_where_maps_came_from_and_repeats_an_encoder_geometry_warning(features_run, tmp_path,
                                                                                   capsys):
    data, out = features_run
    model = tmp_path / "model"
    shutil.copytree(out, model)
    config = json.loads((model / "config.json").read_text())
    config.setdefault("model_info", {})["geometry_warning"] = "the opd encoder was pretrained on 128 px maps"
    (model / "config.json").write_text(json.dumps(config))
    argv = ["evaluate", str(model), "--data", str(data), "--results", str(tmp_path), "--n-boot", "0"]
    assert main(argv) == 0
    assert "warning: feat: the opd encoder was pretrained on 128 px maps" in capsys.readouterr().err
    folder = tmp_path / "feat"   # the run name in config.json
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "the opd encoder was pretrained on 128 px maps" in metrics["warnings"]
    table = pd.read_csv(folder / "predictions.csv")
    for column in ("source_file", "source_index", "cell", "centroid_row_um", "bbox_row0", "group"):
        assert column in table.columns
    assert (table["cell"] == -1).all()   # the tiny dataset holds whole maps, not cells of fields


def test_evaluate_all_maps_of_a_new_dataset(features_run, tmp_path, capsys):
    _, out = features_run
    other = write_tiny_dataset(tmp_path / "other.h5", sessions_per_class=1, maps_per_session=2, seed=7)
    assert main(["evaluate", str(out), "--data", str(other), "--results", str(tmp_path)]) == 2
    assert "--all" in error_line(capsys)
    assert main(["evaluate", str(out), "--data", str(other), "--results", str(tmp_path), "--all",
                 "--n-boot", "0"]) == 0
    assert json.loads((tmp_path / out.name / "metrics.json").read_text())["n"] == 10


def evaluate_deep(tmp_path_factory, results, tta: bool):
    """``evaluate`` of the tiny MobileNetV2 run into ``results`` (as saved, or ``--no-tta``): the run, the
    tta arguments evaluate.evaluate_model got, and the results folder."""
    import opdcells.evaluate

    run = tiny_run(tmp_path_factory, "mobilenetv2", "five_class")
    seen, original = [], opdcells.evaluate.evaluate_model
    argv = ["evaluate", str(run.model_dir), "--data", run.config["dataset"]["path"],
            "--results", str(results), "--n-boot", "0", *([] if tta else ["--no-tta"])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(opdcells.evaluate, "evaluate_model",
                      lambda *a, **kw: seen.append(kw["tta"]) or original(*a, **kw))
        assert main(argv) == 0
    return run, seen, results / run.model_dir.name


@pytest.fixture(scope="module")
def deep_evaluated(tmp_path_factory):
    """The tiny MobileNetV2 run evaluated through the CLI as it was saved (one run, several tests)."""
    return evaluate_deep(tmp_path_factory, tmp_path_factory.mktemp("deep_eval"), tta=True)


def test_evaluate_a_deep_model(deep_evaluated):
    _, _, folder = deep_evaluated
    assert (folder / "training_curves.png").is_file()


def test_evaluate_passes_the_tta_choice(deep_evaluated, tmp_path_factory, tmp_path):
    _, seen, folder = deep_evaluated
    assert seen == [None]     # None: as the model was saved (with tta)
    assert json.loads((folder / "metrics.json").read_text())["test_time_augmentation"] == "dihedral-8"
    _, seen, folder = evaluate_deep(tmp_path_factory, tmp_path, tta=False)
    assert seen == [False]
    assert json.loads((folder / "metrics.json").read_text())["test_time_augmentation"] is None


def test_predict(features_run, tmp_path, capsys):
    _, out = features_run
    exports = write_exports(tmp_path / "exports", per_class=1)
    (tmp_path / "exports" / "broken.mat").write_bytes(b"\x00" * 100)
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(out), str(tmp_path / "exports"), "--out", str(preds)]) == 1
    captured = capsys.readouterr()
    assert "broken.mat" in captured.err
    table = pd.read_csv(preds)
    assert list(table.columns) == csv_columns(["cancer", "blood"], OOD_COLUMNS)
    assert list(table.columns[-5:]) == ["predicted", "p_cancer", "p_blood", "ood_score", "ood_flag"]
    assert len(table) == len(exports)
    dropped = pd.read_csv(dropped_path(preds))
    assert dropped["file"].str.endswith("broken.mat").tolist() == [True] and dropped["index"].isna().all()
    assert "1 dropped, listed in" in captured.out
    assert f"{table['ood_flag'].sum()} of {len(exports)} maps unlike the training data" in captured.err
    assert main(["predict", str(out), *map(str, exports), "--out", str(preds), "-q"]) == 0


@pytest.mark.parametrize("argv, words", [
    (["train", "--data", "{tmp}/missing.h5", "--model", "features"], "missing.h5"),
    (["train", "--data", "{data}", "--model", "no_such_net"], "no_such_net"),
    (["evaluate", "{tmp}/no_run", "--data", "{data}"], "no_run"),
    (["predict", "{tmp}/no_run", "x.mat", "--out", "{tmp}/p.csv"], "no_run"),
    (["train", "--data", "{data}", "--task", "blood_subtypes", "--model", "features", "--out", "{tmp}/r"],
     "blood_subtypes"),
])
def test_errors_print_one_line_and_exit_2(argv, words, tmp_path, tmp_path_factory, capsys):
    data = tiny_dataset(tmp_path_factory)
    if "blood_subtypes" in argv:   # a dataset without blood cells: the task's classes are missing
        data = write_tiny_dataset(tmp_path / "cancer.h5", classes=("SW480", "SW620"), sessions_per_class=1,
                                  maps_per_session=1)
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith("error:") and words in line


def test_usage_error_exits_2(capsys):
    assert main(["train", "--model", "features"]) == 2   # --data is required
    assert "--data" in capsys.readouterr().err


# ---------------------------------------------------------------- one folder per class (issue 16)


@pytest.fixture(scope="module")
def one_folder_per_class(tmp_path_factory):
    """The usual lab layout: CLASS/dayK_cellI.mat directly in one folder per class (no session
    folders), loaded with load_data.py; and the same files loaded through a manifest with a group column."""
    from helpers import simulated_opd

    from load_data import main as load_main
    from opdcells.simulate import write_mat5

    root = tmp_path_factory.mktemp("lab")
    rows = ["path,label,group"]
    for cls in ("SW480", "granulocytes"):
        (root / "exports" / cls).mkdir(parents=True)
        for day in (1, 2, 3):
            for i in range(3):
                opd, session = simulated_opd(cls, day, i)
                name = f"{cls}/day{day}_cell{i}.mat"
                write_mat5(root / "exports" / name, opd * 2 * math.pi / session.wavelength_nm, session)
                rows.append(f"exports/{name},{cls},day{day}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    options = ["--out-pixel-size-um", "1.0", "--out-size", "32", "-q"]
    assert load_main([str(root / "exports"), "--out", str(root / "by_folder.h5"), *options]) == 0
    assert load_main(["--manifest", str(root / "manifest.csv"), "--out", str(root / "by_manifest.h5"),
                      *options]) == 0
    return root


def train_features(data, out, *extra) -> int:
    return main(["train", "--data", str(data), "--model", "features", "--out", str(out), "--n-boot", "20",
                 "-q", *extra])


def test_one_folder_per_class_gets_one_line_explaining_what_to_do(one_folder_per_class, tmp_path, capsys):
    assert train_features(one_folder_per_class / "by_folder.h5", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "UserWarning" not in err and "unseen labels" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "by_folder.h5" in line
    assert "each class is one acquisition group" in line
    assert "--group-pattern" in line and "--split-by map" in line
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("way, extra", [("pattern", ["--group-pattern", r"day\d"]),
                                        ("by_map", ["--split-by", "map"]), ("manifest", [])])
def test_one_folder_per_class_trains_with_each_documented_way_forward(one_folder_per_class, tmp_path,
                                                                      capsys, way, extra):
    data = one_folder_per_class / ("by_manifest.h5" if way == "manifest" else "by_folder.h5")
    assert train_features(data, tmp_path / way, *extra) == 0
    config = json.loads((tmp_path / way / "config.json").read_text())
    metrics = json.loads((tmp_path / way / "metrics.json").read_text())
    split = json.loads((tmp_path / way / "split.json").read_text())
    assert config["dataset"]["origin"] == "simulated"   # the simulator stamps its exports
    if way == "by_map":
        assert config["split"]["by"] == "map"
        assert "session effects are not tested" in config["split"]["warning"]
        assert any("session effects are not tested" in w for w in metrics["warnings"])
        assert "session effects are not tested" in capsys.readouterr().err
    else:
        assert config["split"]["by"] == "group" and not config["split"]["warning"]
        days = [set(split["groups"][part]) for part in ("train", "val", "test")]
        assert set().union(*days) == {"day1", "day2", "day3"} and sum(map(len, days)) == 3


def test_screen_a_spiked_sample_in_shards_and_merge_them(features_run, tmp_path, capsys):
    _, model = features_run
    sample = tmp_path / "sample"
    assert main(["simulate", "--out", str(sample), "--sample", "14", "--spike", "SW480:2",
                 "--maps-per-file", "4", "-q"]) == 0
    assert len(list(sample.glob("stack_*.mat"))) == 4
    assert main(["screen", str(model), str(sample), "--out", str(tmp_path / "all"), "--fpr", "0.05",
                 "-q"]) == 0
    assert "16 maps from 4 files screened" in capsys.readouterr().out
    for k in (1, 2):
        assert main(["screen", str(model), str(sample), "--out", str(tmp_path / f"s{k}"), "--fpr", "0.05",
                     "--shard", f"{k}/2", "-q"]) == 0
    assert main(["screen-merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out",
                 str(tmp_path / "merged"), "-q"]) == 0
    for name in ("scores.csv", "candidates.csv", "scores.dropped.csv"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "all" / name).read_text()
    summary = json.loads((tmp_path / "all/summary.json").read_text())
    assert summary["targets"] == ["cancer"] and summary["operating_point"]["fpr"] == 0.05
    assert (tmp_path / "all/report.html").read_text().count('class="cand"') == min(summary["flagged"], 120)


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--out", "x", "--spike", "SW480:2"], "--spike needs --sample"),
    (["screen", "m", "e", "--out", "o", "--shard", "3"], "not K/N"),
])
def test_screen_options_are_checked(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_calibrate_threshold_states_its_confidence(features_run, tmp_path, capsys):
    _, model = features_run
    control = tmp_path / "control"
    assert main(["simulate", "--out", str(control), "--sample", "20", "--maps-per-file", "10", "-q"]) == 0
    assert main(["calibrate-threshold", str(model), str(control), "--out", str(tmp_path / "bad"),
                 "--fpr", "0.05", "--fpr-confidence", "1.5", "-q"]) == 2      # refused before scoring
    assert "confidence must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["calibrate-threshold", str(model), str(control), "--out", str(tmp_path / "cal"),
                 "--fpr", "0.05", "--fpr-confidence", "0.5", "-q"]) == 0
    assert "at 0.5 confidence: Neyman-Pearson order statistic" in capsys.readouterr().out
    point = json.loads((tmp_path / "cal/operating_point.json").read_text())["point"]
    assert point["rate_at_threshold"]["confidence"] == 0.5 and point["control"]["n_in_distribution"] <= 20


def test_captured_stderr_holds_what_c_libraries_write_to_descriptor_2(capfd):
    """What a library writes to file descriptor 2 (as TensorFlow Lite's C++ does) is caught, also when the
    block raises; stderr works again afterwards."""
    with captured_stderr() as lines:
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nsecond line\n")
        assert lines == []
    assert lines == ["INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "second line"]
    with pytest.raises(RuntimeError), captured_stderr() as failed:
        os.write(2, b"converter noise\n")
        raise RuntimeError("conversion failed")
    assert failed == ["converter noise"]
    os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"

