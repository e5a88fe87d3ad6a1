"""``python -m opdcells notebooks`` with several notebooks at once (``--jobs``): times, threads, failures."""
from __future__ import annotations

import re

from opdcells import cli
from opdcells.notebooks import THREAD_VARIABLES, thread_environment


def small_notebook(path, code: str):
    """A notebook of a ``parameters`` cell (the names the command line injects) and one cell of ``code``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell("".join(f"{name} = ''\n" for name in
                                                   ("QUICK", "DATA_PATH", "SEED", "SAVED_MODELS", "RESULTS")))
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)
    return path


def test_thread_environment_sets_every_pool_and_keeps_what_the_user_set():
    env = thread_environment({"OMP_NUM_THREADS": "3"}, 1)
    assert env["OMP_NUM_THREADS"] == "3"
    assert all(env[name] == "1" for name in THREAD_VARIABLES if name != "OMP_NUM_THREADS")
    assert thread_environment({}, None) == {}


def test_concurrent_notebooks_run_with_a_thread_each_and_show_their_wall_and_cpu_time(tmp_path, capsys):
    busy = "import os, time\nt = time.process_time()\nwhile time.process_time() - t < 1: pass\n"   # 1 s CPU
    code = busy + "print(os.environ['TF_NUM_INTRAOP_THREADS'])"
    paths = [small_notebook(tmp_path / f"n{i}.ipynb", code) for i in range(2)]
    assert cli.main(["notebooks", *map(str, paths), "--jobs", "2", "--results", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    for name in ("n0.ipynb", "n1.ipynb"):
        assert '"1\\n"' in (tmp_path / "r" / "notebooks" / name).read_text(), "one thread a pool each"
        wall, cpu = re.search(rf"{name}: (\d+) s wall, (\d+) s CPU", err).groups()
        assert int(cpu) >= 1 and int(wall) >= 1, "the kernel's CPU, the busy loop included"
    assert re.search(r"all: \d+ s wall, \d+ s CPU \(2 at a time\)", err)


def test_one_failing_notebook_among_concurrent_ones_fails_the_command_with_its_name(tmp_path, capsys):
    good = small_notebook(tmp_path / "good.ipynb", "print('fine')")
    bad = small_notebook(tmp_path / "bad.ipynb", "raise ValueError('broken cell')")
    status = cli.main(["notebooks", str(bad), str(good), "--jobs", "2", "--results", str(tmp_path / "r"),
                       "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: cell In [") and "ValueError: broken cell" in err[0]
    assert "fine" in (tmp_path / "r" / "notebooks" / "good.ipynb").read_text(), "the other one still ran"


def test_jobs_below_one_is_a_one_line_error(tmp_path, capsys):
    good = small_notebook(tmp_path / "good.ipynb", "print('fine')")
    assert cli.main(["notebooks", str(good), "--jobs", "0", "--results", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "error: --jobs must be at least 1, not 0"
