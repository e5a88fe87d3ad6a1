"""Command line: ``python -m opdcells {simulate,load,train,evaluate,predict,pretrain,notebooks} ...``.

Every command is a ``register(subparsers)`` function that adds its parser (options from
:func:`opdcells.console.common_options`, and :func:`opdcells.ingest.add_reading_options` wherever exports
are read) and sets ``run``: the ones here, :func:`opdcells.load.register`,
:func:`opdcells.pretrain_options.register` and :func:`opdcells.notebooks.register`. No parser imports
TensorFlow: it is imported inside the ``run`` functions, through :func:`opdcells.console.import_tensorflow`
(no start-up noise), so ``simulate``, ``load`` and every ``--help`` stay fast.

Exit status: :mod:`opdcells.console` (0 success; 1 some inputs skipped; 2 usage or opdcells error, or
nothing done; 130 interrupted).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import load, notebooks, pretrain_options
from .config import (
    CLASS_WEIGHTINGS,
    DISTRIBUTE,
    FUSIONS,
    LR_SCHEDULES,
    MODEL_NAMES,
    OPTIMIZERS,
    PROFILES,
    SPLIT_BY,
    field_default,
    field_help,
)
from .console import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    common_options,
    import_tensorflow,
    setup_logging,
)
from .errors import OPDCellsError

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------- simulate


def register_simulate(subparsers) -> None:
    """Add the ``simulate`` command: simulated exports of the five classes, or a screening sample.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The commands of the parser.
    """
    p = subparsers.add_parser("simulate", parents=[common_options()], help="write simulated OPD exports",
                              description="Simulate the five classes as MATLAB exports (one folder per "
                                          "class and session) plus truth.csv.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--n-per-class", type=int, default=400, metavar="N", help="maps per class (400)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default %(default)s)")
    p.add_argument("--sessions-per-class", type=int, default=5, metavar="K",
                   help="acquisition sessions per class (5)")
    sample = p.add_argument_group("screening sample (instead of the five classes)")
    sample.add_argument("--sample", type=int, metavar="N_BLOOD",
                        help="a blood sample of N_BLOOD cells in one new session, as MATLAB v7.3 stacks")
    sample.add_argument("--spike", default="", metavar="CLASS:K,...",
                        help="cancer cells spiked into the sample, e.g. SW480:10,SW620:10")
    sample.add_argument("--maps-per-file", type=int, default=1000, metavar="N", help="maps per stack (1000)")
    sample.add_argument("--control-of", type=Path, metavar="SAMPLE_DIR",
                        help="a negative control: blood cells of the same session as this simulated sample "
                             "(its optics and batch), none of its cells; give the control its own --seed")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="simulating processes (1); the files are the same whatever it is")
    p.set_defaults(run=run_simulate)


def run_simulate(args) -> int:
    """Run the ``simulate`` command: write the simulated exports and print where they went.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    from .simulate import simulate_dataset

    if args.sample is not None:
        from .spikein import parse_spikes, session_seed_of, simulate_sample

        session_seed = None if args.control_of is None else session_seed_of(args.control_of)
        if session_seed is not None and session_seed == args.seed:
            raise ValueError(f"--seed {args.seed} is the seed of {args.control_of}: a control needs its own "
                             "--seed, or it repeats the sample's cells")
        truth = simulate_sample(args.out, args.sample, parse_spikes(args.spike), args.seed,
                                session_seed=session_seed, maps_per_file=args.maps_per_file,
                                workers=args.workers, progress=not args.quiet)
        print(f"simulated sample in {args.out} (truth: {truth})")
        return EXIT_OK
    for given, option in ((args.spike, "--spike"), (args.control_of, "--control-of")):
        if given:
            raise ValueError(f"{option} needs --sample N_BLOOD")
    truth = simulate_dataset(args.out, args.n_per_class, args.seed, progress=not args.quiet,
                             sessions_per_class=args.sessions_per_class, workers=args.workers)
    print(f"simulated exports in {args.out} (truth: {truth})")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- train


def add_saved_models_option(parser: argparse.ArgumentParser) -> None:
    """``--saved-models DIR``: the one folder where run names are looked up and runs are saved.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser.
    """
    parser.add_argument("--saved-models", type=Path, metavar="DIR",
                        help="folder of named runs (default $OPDCELLS_SAVED_MODELS, else the repository's "
                             "saved_models/; never the current directory's unless given)")


def register_train(subparsers) -> None:
    """Add the ``train`` command: one option per TrainConfig field, plus the task and the data.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The commands of the parser.
    """
    p = subparsers.add_parser("train", parents=[common_options()], help="train a model on a dataset",
                              description="Train a classifier on an opdcells dataset and write the model "
                                          "folder (model, config.json, history.csv, metrics.json, "
                                          "split.json).")
    p.add_argument("--data", required=True, type=Path, metavar="DATASET.h5")
    p.add_argument("--config", type=Path, metavar="CONFIG.json",
                   help="training config to start from (TrainConfig.to_json's, or a model folder's "
                        "config.json); the options below override its fields")
    p.add_argument("--classes", metavar="A,B,...", help="the task's classes, one task class each")
    p.add_argument("--cv", type=int, metavar="K",
                   help="group k-fold cross-validation: K folds of whole acquisition groups, every map "
                        "tested once; each fold validates on --val-size of whole groups from its own "
                        "training groups, as train does; writes the fold models, the pooled table (with "
                        "baselines) and the out-of-fold probabilities to --out")
    p.add_argument("--out", type=Path, metavar="DIR", help="model folder (default SAVED_MODELS/MODEL_TASK)")
    add_saved_models_option(p)
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                   help="defaults of the settings: quick (CPU) or full (default quick)")
    for flags, field_name, kw in TRAIN_OPTIONS:
        default = field_default(field_name)
        p.add_argument(*flags, dest=field_name, **kw,
                       help=field_help(field_name).rstrip(".") + (f" ({default})" if default else ""))
    p.add_argument("--n-boot", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the CIs (default %(default)s)")
    p.set_defaults(run=run_train)


def _names(text: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None stays None."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


_BOOL = {"action": argparse.BooleanOptionalAction, "default": None}
#: ``train`` options, each a field of ``config.TrainConfig`` (its docstring entry is the help text):
#: (flags, field, argparse keywords). An option left out keeps the profile's (or --config's) value.
TRAIN_OPTIONS = [
    (("--model",), "model", {"metavar": "|".join(MODEL_NAMES)}),
    (("--task",), "task", {"metavar": "TASK"}),
    (("--weights",), "weights", {"metavar": "random|imagenet|opd|opd:NAME|PATH"}),
    (("--alpha",), "alpha", {"type": float, "metavar": "W"}),
    (("--input-size",), "input_size", {"type": int, "metavar": "PX"}),
    (("--crop-px",), "crop_px", {"type": int, "metavar": "PX"}),
    (("--epochs",), "epochs", {"type": int, "metavar": "N"}),
    (("--patience",), "patience", {"type": int, "metavar": "N"}),
    (("--batch-size",), "batch_size", {"type": int, "metavar": "B"}),
    (("--learning-rate",), "learning_rate", {"type": float, "metavar": "LR"}),
    (("--lr-schedule",), "lr_schedule", {"choices": LR_SCHEDULES}),
    (("--optimizer",), "optimizer", {"choices": OPTIMIZERS}),
    (("--weight-decay",), "weight_decay", {"type": float, "metavar": "WD"}),
    (("--warmup-epochs",), "warmup_epochs", {"type": int, "metavar": "N"}),
    (("--label-smoothing",), "label_smoothing", {"type": float, "metavar": "EPS"}),
    (("--head-epochs",), "head_epochs", {"type": int, "metavar": "N"}),
    (("--freeze-batchnorm",), "freeze_batchnorm", _BOOL),
    (("--physical-quantities",), "physical_quantities", _BOOL),
    (("--fusion",), "fusion", {"choices": FUSIONS}),
    (("--refit",), "refit", _BOOL),
    (("--augment",), "augment", _BOOL),
    (("--tta",), "tta", _BOOL),
    (("--norm-scale-nm",), "norm_scale_nm", {"type": float, "metavar": "NM"}),
    (("--class-weight",), "class_weight", {"choices": CLASS_WEIGHTINGS}),
    (("--seed",), "seed", {"type": int, "metavar": "S"}),
    (("--split-seed",), "split_seed", {"type": int, "metavar": "S"}),
    (("--test-size",), "test_size", {"type": float, "metavar": "F"}),
    (("--val-size",), "val_size", {"type": float, "metavar": "F"}),
    (("--test-groups",), "test_groups", {"type": _names, "metavar": "G1,G2"}),
    (("--val-groups",), "val_groups", {"type": _names, "metavar": "G1,G2"}),
    (("--split-by",), "split_by", {"choices": SPLIT_BY}),
    (("--group-pattern",), "group_pattern", {"metavar": "REGEX"}),
    (("--distribute",), "distribute", {"choices": DISTRIBUTE}),
]
def train_settings(args) -> dict:
    """The TrainConfig fields given on the command line (None: not given; ``--no-augment`` -> False).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed ``train`` options.

    Returns
    -------
    dict
        TrainConfig field -> value given (model and task excluded).
    """
    return {field_name: getattr(args, field_name) for _, field_name, _ in TRAIN_OPTIONS
            if getattr(args, field_name) is not None and field_name not in ("model", "task")}


def run_train(args) -> int:
    """Run the ``train`` command: train one model (or cross-validate with ``--cv``) and print its test report.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    import_tensorflow(args.verbose)
    from .config import TrainConfig
    from .evaluate import format_report
    from .tasks import resolve_task
    from .train import train

    if args.classes and args.task:
        raise ValueError("give --task or --classes, not both")
    task = resolve_task(classes=args.classes) if args.classes else args.task
    config = TrainConfig.from_json(args.config) if args.config else None
    common = dict(config=config, profile=args.profile, n_boot=args.n_boot, verbose=0 if args.quiet else 2,
                  saved_models=args.saved_models, **train_settings(args))
    if args.cv is not None:
        return _run_cv(args, task, common)
    result = train(args.data, args.model, task, args.out, **common)
    training = result.config["training"]
    print(f"model saved to {result.model_dir} (init {result.config['init']}, {training['epochs_run']} "
          f"{training['epoch_unit']}s, {training['time_s']:.0f} s)")
    print("test groups:")
    print(format_report(result.metrics))
    return EXIT_OK


def _run_cv(args, task, common) -> int:
    """``train --cv K``: group k-fold cross-validation, printed as the pooled table and per-fold figures."""
    from .crossval import cross_validate
    from .evaluate import format_report, markdown_table

    if args.test_groups or args.val_groups or args.group_pattern or args.split_by not in (None, "group"):
        raise ValueError("--cv leaves every dataset group out in turn: drop --test-groups/--val-groups/"
                         "--group-pattern/--split-by")
    config = common["config"]
    seed = args.seed if args.seed is not None else config.seed if config else 0
    common = {k: v for k, v in common.items() if k not in ("val_size", "seed")}
    cv = cross_validate(args.data, args.model or (config.model if config else "mobilenetv2"), task, args.cv,
                        out=args.out, val_size=args.val_size, seed=seed, **common)
    print(f"{args.cv}-fold group cross-validation of {args.model} on {cv.task.name} (every map tested once):")
    print(format_report(cv.reports[args.model]))
    print("\npooled out-of-fold predictions, model and baselines:")
    print(markdown_table(cv.table.drop(columns=["task"]).dropna(axis=1, how="all")), end="")
    print("\nper fold:")
    print(markdown_table(cv.folds), end="")
    print(f"tables, predictions and figures in {cv.files['table_csv'].parent}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- evaluate


def register_evaluate(subparsers) -> None:
    """Add the ``evaluate`` command: a saved model on its test split or on every map.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The commands of the parser.
    """
    p = subparsers.add_parser("evaluate", parents=[common_options()], help="evaluate a saved model",
                              description="Evaluate a model on its stored test split (or on every map of "
                                          "the task's classes with --all); write metrics and figures.")
    p.add_argument("model", metavar="MODEL", help="model folder, or run name in SAVED_MODELS")
    add_saved_models_option(p)
    p.add_argument("--data", required=True, type=Path, metavar="DATASET.h5")
    p.add_argument("--results", type=Path, default=Path("results"), metavar="DIR",
                   help="results folder; files go to DIR/<run name>/ (default results)")
    p.add_argument("--all", action="store_true", help="every map of the task's classes, not the test split")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mean over each map's 8 rotations and reflections (default: as the model was saved)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="maps predicted together (default %(default)s)")
    p.add_argument("--n-boot", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the CIs (default %(default)s)")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    """Run the ``evaluate`` command: evaluate a saved model and write metrics, predictions and figures.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    import_tensorflow(args.verbose)
    from .dataset import open_dataset
    from .evaluate import evaluate_model, format_report, stored_test_indices, write_results
    from .modelfolder import load_model

    with open_dataset(args.data) as ds:
        model = load_model(args.model, dataset=ds, saved_models=args.saved_models)
        indices = None if args.all else stored_test_indices(model, ds)
        evaluation = evaluate_model(model, ds, indices, batch_size=args.batch_size, n_boot=args.n_boot,
                                    tta=args.tta)
        written = write_results(evaluation, model, ds, args.results / model.name)
    which = "all maps of the task's classes" if args.all else "stored test split"
    print(f"{model.name} on {args.data} ({which}):")
    print(format_report(evaluation.report))
    print(f"results in {written['metrics'].parent}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- predict


def add_model_and_exports(parser: argparse.ArgumentParser, out_metavar: str) -> None:
    """MODEL, EXPORT..., --saved-models, --out and the reading options of ``load`` (commands that apply a
    model to new exports).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser.
    out_metavar : str
        How ``--out`` reads in the help (e.g. ``PREDS.csv``).
    """
    from .ingest import add_reading_options

    parser.add_argument("model", metavar="MODEL", help="model folder, or run name in SAVED_MODELS")
    add_saved_models_option(parser)
    parser.add_argument("exports", nargs="+", type=Path, metavar="EXPORT", help="export files or folders")
    parser.add_argument("--out", required=True, type=Path, metavar=out_metavar)
    add_reading_options(parser)


def register_predict(subparsers) -> None:

    """Add the ``predict`` command: a saved model on new exports.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The commands of the parser.
    """
    p = subparsers.add_parser("predict", parents=[common_options()], help="predict classes of new exports",
                              description="Read exports exactly like load_data.py (at the model's pixel "
                                          "size and map size) and write one CSV row per map.",
                              epilog="Exit status: 0 all predicted; 1 some files or maps skipped; "
                                     "2 nothing predicted or an error.")
    add_model_and_exports(p, "PREDS.csv")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="maps predicted together (default %(default)s)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mean over each map's 8 rotations and reflections (default: as the model was saved)")
    add_workers_option(p)
    p.set_defaults(run=run_predict)


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    """``--workers N``: processes reading and preprocessing the exports (default: the machine's cores).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser; the option is added to it (``dest="workers"``, an int).
    """
    from .predict import default_workers

    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="processes reading and preprocessing the exports; the output is the same for "
                             "any N (default: the machine's cores, %(default)s)")


def run_predict(args) -> int:
    """Run the ``predict`` command: predict the classes of new exports into a CSV.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    import_tensorflow(args.verbose)
    from .ingest import reading_options
    from .modelfolder import load_model
    from .predict import ingest_options, predict_files

    model = load_model(args.model, saved_models=args.saved_models)
    options = ingest_options(model, **reading_options(args))
    result = predict_files(model, args.exports, args.out, options=options, batch_size=args.batch_size,
                           tta=args.tta, workers=args.workers, progress=not args.quiet)
    dropped = f"; {len(result.dropped)} dropped, listed in {result.dropped_out}" if result.dropped else ""
    print(f"{result.n_maps} maps from {result.n_files} files -> {result.out}"
          + (f"; {len(result.skipped_files)} files skipped" if result.skipped_files else "") + dropped)
    return result.status


# ------------------------------------------------------------------------------------------- screen


def register_screen(subparsers) -> None:
    """Add the ``screen`` and ``screen-merge`` commands: rare target cells in a sample.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The commands of the parser.
    """
    from .calibration import DEFAULT_CONFIDENCE, DEFAULT_FPR
    from .screen import DEFAULT_PREVALENCE, OOD_MORPHOLOGY

    p = subparsers.add_parser(
        "screen", parents=[common_options()], help="screen a sample for rare target cells",
        description="Score every map of a sample with the model's calibrated probability of a target "
                    "(cancer) class, flag those above the operating point that are not out of distribution, "
                    "and write scores.csv, candidates.csv, summary.json and report.html to --out.",
                              epilog="Exit status: 0 all screened; 1 some files or maps skipped; 2 nothing "
                                     "screened or an error.")
    add_model_and_exports(p, "DIR")
    p.add_argument("--target", type=_names, metavar="CLASS,...",
                   help="target classes (default: the model's cancer classes)")
    p.add_argument("--fpr", type=float, metavar="RATE",
                   help=f"false-positive rate of the operating point (default the model's, {DEFAULT_FPR:g})")
    p.add_argument("--prevalence", type=float, default=DEFAULT_PREVALENCE, metavar="P",
                   help=f"assumed fraction of target cells, for the expected purity ({DEFAULT_PREVALENCE:g})")
    p.add_argument("--shard", type=_shard, default=(1, 1), metavar="K/N",
                   help="screen every N-th file starting with the K-th (job arrays); join with screen-merge "
                        "(default 1/1: every file)")
    p.add_argument("--sample-check", action="store_true",
                   help="raise the threshold to the sample's own upper quantile when more maps score "
                        "above it than --fpr and --prevalence allow (caps the candidates: give the largest "
                        "plausible --prevalence)")
    p.add_argument("--ood-morphology", choices=OOD_MORPHOLOGY, default="near",
                   help="maps whose out-of-distribution morphology features (dry mass, area, shape) are "
                        "measured: 'near' the threshold or above it (the candidates and flags are the same, "
                        "8 ms a map less) or 'all' (every map's OOD score uses them) (default %(default)s)")
    p.add_argument("--operating-point", type=Path, metavar="FILE",
                   help="threshold from this operating-point file (calibrate-threshold: a negative control "
                        "of the sample's session) instead of the model's validation one")
    p.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="maps predicted together (default %(default)s)")
    add_workers_option(p)
    p.set_defaults(run=run_screen)
    c = subparsers.add_parser(
        "calibrate-threshold", parents=[common_options()],
        help="set the screening threshold on a negative control",
        description="Score a negative control (blood only, imaged in the sample's session) as screen does "
                    "and set the threshold for --fpr on its in-distribution maps; write "
                    "DIR/operating_point.json (for screen --operating-point) and the control's screening "
                    "outputs in DIR/control/.",
        epilog="Exit status: 0 operating point written; 2 an error.")
    add_model_and_exports(c, "DIR")
    c.add_argument("--target", type=_names, metavar="CLASS,...",
                   help="target classes (default: the model's cancer classes)")
    c.add_argument("--fpr", type=float, metavar="RATE",
                   help=f"wanted false-positive rate (default the model's, {DEFAULT_FPR:g})")
    c.add_argument("--fpr-confidence", type=float, default=DEFAULT_CONFIDENCE, metavar="P",
                   help="probability that the false-positive rate on new blood cells of the session is at "
                        "most --fpr (Neyman-Pearson order statistic of the control; default %(default)s; "
                        "0.5 gives about the control's plain 1 - fpr quantile, a point estimate exceeded "
                        "half the time); the control needs at least log(1 - P) / log(1 - fpr) "
                        "in-distribution maps (2995 for 1e-3 at 0.95)")
    c.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="maps predicted together (default %(default)s)")
    add_workers_option(c)
    c.set_defaults(run=run_calibrate_threshold)
    m = subparsers.add_parser("screen-merge", parents=[common_options()],
                              help="join the outputs of screen shards",
                              description="Join the --out folders of screen --shard runs into the outputs "
                                          "one run over all files gives.")
    m.add_argument("shards", nargs="+", type=Path, metavar="DIR")
    m.add_argument("--out", required=True, type=Path, metavar="DIR")
    m.set_defaults(run=run_screen_merge)


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit():
        raise argparse.ArgumentTypeError(f"shard {text!r} is not K/N (e.g. 3/10)")
    return int(k), int(n)


def run_screen(args) -> int:
    """Run the ``screen`` command: score a sample's cells and write the candidates and the report.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    import_tensorflow(args.verbose)
    from .ingest import reading_options
    from .modelfolder import load_model
    from .predict import ingest_options
    from .screen import ood_check, screen_files, screen_settings, share_cores

    share_cores(args.workers)   # before the model loads: TensorFlow's pools are fixed at its first operation
    model = load_model(args.model, saved_models=args.saved_models)
    settings = screen_settings(model, targets=args.target, fpr=args.fpr, prevalence=args.prevalence,
                               shard=args.shard, sample_check=args.sample_check,
                               ood_morphology=args.ood_morphology, operating_point=args.operating_point)
    result = screen_files(model, args.exports, args.out, settings, options=ingest_options(model,
                          **reading_options(args)), ood=ood_check(model), batch_size=args.batch_size,
                          workers=args.workers, progress=not args.quiet)
    _print_screen(result)
    return result.status


def run_calibrate_threshold(args) -> int:
    """Run the ``calibrate-threshold`` command: an operating point set on a negative control.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    import_tensorflow(args.verbose)
    from .control import calibrate_control
    from .ingest import reading_options
    from .modelfolder import load_model
    from .predict import ingest_options
    from .screen import ood_check, share_cores

    share_cores(args.workers)   # as screen: the control is scored the way the sample will be
    model = load_model(args.model, saved_models=args.saved_models)
    options = ingest_options(model, **reading_options(args))
    done = calibrate_control(model, args.exports, args.out, options=options, fpr=args.fpr,
                             confidence=args.fpr_confidence, targets=args.target, ood=ood_check(model),
                             batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    point, control, rate = done.point, done.point.control, done.point.rate_at_threshold
    print(f"threshold {point.threshold:.6g} (95% CI {point.threshold_ci[0]:.4g}-{point.threshold_ci[1]:.4g}) "
          f"for a false-positive rate of {point.fpr:g} at {rate['confidence']:g} confidence: {point.basis}; "
          f"control rate {control['n_above']}/{control['n_in_distribution']} (95% CI "
          f"{control['rate_ci'][0]:.2g}-{control['rate_ci'][1]:.2g}), expected rate {rate['expected']:.2g} "
          f"(95% interval {rate['expected_ci'][0]:.2g}-{rate['expected_ci'][1]:.2g}) -> {done.path}")
    return EXIT_OK


def run_screen_merge(args) -> int:
    """Run the ``screen-merge`` command: join the shards of a screening job array.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        The exit status (:mod:`opdcells.console`).
    """
    from .screen import merge_screens

    result = merge_screens(args.shards, args.out)
    _print_screen(result)
    return result.status


def _print_screen(result) -> None:
    print(f"{result.n_maps} maps from {result.n_files} files screened: {result.n_flagged} flagged, "
          f"{result.n_ood} out of distribution -> {result.out}/report.html"
          + (f"; {len(result.skipped_files)} files skipped" if result.skipped_files else ""))


# ------------------------------------------------------------------------------------------- main

#: The commands in the order ``--help`` lists them: their ``register(subparsers)`` functions.
COMMANDS: dict[str, Callable] = {
    "simulate": register_simulate,
    "load": load.register,
    "train": register_train,
    "evaluate": register_evaluate,
    "predict": register_predict,
    "screen": register_screen,
    "pretrain": pretrain_options.register,
    "notebooks": notebooks.register,
}


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser: every command of :data:`COMMANDS` (none imports TensorFlow).

    Returns
    -------
    argparse.ArgumentParser
        ``python -m opdcells``'s parser; each command sets ``run`` (a function of the parsed arguments
        returning the exit status).
    """
    parser = argparse.ArgumentParser(prog="python -m opdcells",
                                     description="Tell cancer cells from blood cells in OPD maps.",
                                     epilog="exit status: 0 ok; 1 some inputs skipped; 2 usage or opdcells "
                                            "error, or nothing done; 130 interrupted")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS.values():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 success; 1 some inputs skipped; 2 usage or opdcells error, or nothing done; 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (2) or --help (0)
        return int(exc.code or 0)
    restore = setup_logging(args.quiet, args.verbose, summary=getattr(args, "summary_logger", None))
    try:
        return int(args.run(args))
    except (OPDCellsError, ValueError) as exc:
        log.debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        restore()
    return EXIT_FAILED
