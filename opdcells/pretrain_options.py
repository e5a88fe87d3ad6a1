"""The ``pretrain`` command's options and defaults, without TensorFlow.

``python -m opdcells pretrain --help`` (and ``python -m opdcells --help``) read this module only; the
command's :func:`run` imports :mod:`opdcells.pretrain` (and so TensorFlow) when a run starts. The
defaults of :func:`opdcells.pretrain.pretrain` are the ones named here.
"""
from __future__ import annotations

import shlex

from .console import EXIT_OK, common_options, import_tensorflow

__all__ = ["METHODS", "BACKBONES", "FLOAT16_BACKBONES", "METHOD_DEFAULTS", "DEFAULT_N_SIM",
           "SIM_MAPS_PER_SESSION", "register", "cli_command", "resume_command", "run"]

METHODS = ("simclr", "byol", "dino", "supervised-sim")
#: ``--backbone`` -> ``models.build_encoder`` architecture.
BACKBONES = {"mobilenetv2": "mobilenetv2", "resnet50": "resnet50", "vgg16": "vgg16", "dinov2": "dinov2"}
#: Backbones whose encoder weights are stored as float16 by default (float32 no-top files: ResNet50
#: ~94 MB, VGG16 ~59 MB; the shipped encoders must stay under 150 MB together).
FLOAT16_BACKBONES = ("resnet50", "vgg16")
SIM_MAPS_PER_SESSION = 40
DEFAULT_N_SIM = 10000
#: Per-method defaults: epochs, learning rate, weight decay.
METHOD_DEFAULTS = {
    "simclr": {"epochs": 20, "learning_rate": 1e-3, "weight_decay": 1e-4},
    "byol": {"epochs": 20, "learning_rate": 1e-3, "weight_decay": 1e-4},
    "dino": {"epochs": 20, "learning_rate": 5e-4, "weight_decay": 0.04},
    "supervised-sim": {"epochs": 10, "learning_rate": 1e-3, "weight_decay": 1e-4},
}


def register(subparsers) -> None:
    """Add the ``pretrain`` command to ``python -m opdcells`` (see ``opdcells.cli``).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The commands of the parser.
    """
    p = subparsers.add_parser("pretrain", parents=[common_options()], help="pretrain an OPD encoder",
                              description="Pretrain an OPD encoder self-supervised (SimCLR, BYOL, DINO) on "
                                          "unlabelled maps, or supervised on simulated maps.")
    p.add_argument("--data", nargs="*", default=[], metavar="DATASET.h5",
                   help="datasets of unlabelled maps (self-supervised); for supervised-sim, evaluation "
                        "datasets its simulated sessions must be disjoint from. None: simulated maps")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="mobilenetv2",
                   help="encoder architecture (default %(default)s)")
    p.add_argument("--method", choices=METHODS, default="simclr",
                   help="pretraining method (default %(default)s)")
    p.add_argument("--out", default=None, help="output folder, e.g. saved_models/NAME (required unless "
                   "--resume); its checkpoint is OUT.checkpoint; to ship the encoder, "
                   "opdcells/pretrained/NAME plus its opdcells.registry entry (docs/pretraining.md)")
    p.add_argument("--epochs", type=int, default=None, help="default per method: " + ", ".join(
        f"{m} {d['epochs']}" for m, d in METHOD_DEFAULTS.items()))
    p.add_argument("--input-size", type=int, default=64,
                   help="model input size after the resize, px (default %(default)s)")
    p.add_argument("--n-sim", type=int, default=DEFAULT_N_SIM, help="simulated maps (supervised-sim, or SSL "
                   "without --data); ~0.1 s of CPU each (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="maps per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method)")
    p.add_argument("--alpha", type=float, default=None, help="MobileNetV2 width (default 0.35)")
    p.add_argument("--exclude-test", nargs="*", default=[], metavar="MODEL_DIR",
                   help="leave out the test-split maps of these trained model folders")
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="simulate N maps from unseen sessions and record linear/k-NN probe accuracy "
                        "(default %(default)s: no probe)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes and write the encoder folder (default: no "
                        "limit); --resume continues from the last complete epoch")
    p.add_argument("--chunk-epochs", type=int, default=None, metavar="N",
                   help="train at most N epochs now (the schedule spans --epochs); continue with --resume")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT_DIR",
                   help="continue the run of this checkpoint (OUT.checkpoint, written after every epoch) "
                        "with its own settings and schedule; only --max-minutes, --chunk-epochs, --workers, "
                        "--out and --export-only may be given with it")
    p.add_argument("--export-only", action="store_true",
                   help="with --resume: train nothing, write the encoder folder of the checkpoint (probed)")
    p.add_argument("--weights-dtype", choices=("float32", "float16"), default=None,
                   help="storage of encoder.weights.h5, loaded back as float32 (default float16 for "
                        f"{', '.join(FLOAT16_BACKBONES)}, else float32)")
    p.add_argument("--sim-cache", default=None, metavar="DIR", help="cache simulated maps as .npz here")
    p.add_argument("--sim-maps-per-session", type=int, default=SIM_MAPS_PER_SESSION, metavar="N",
                   help="maps per simulated session (fewer: more sessions, more acquisition variety; "
                        "default %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that simulate the corpus (default %(default)s)")
    p.add_argument("--init", default=None, metavar="ENCODER_DIR",
                   help="start from this encoder folder (an earlier run), or opd / opd:NAME (a registry "
                        "entry), instead of random weights")
    p.set_defaults(run=run, option_defaults={key: p.get_default(key) for key, _ in _CLI_OPTIONS})


_CLI_OPTIONS = (("data", "--data"), ("backbone", "--backbone"), ("method", "--method"), ("out", "--out"),
                ("epochs", "--epochs"), ("input_size", "--input-size"), ("n_sim", "--n-sim"),
                ("seed", "--seed"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("alpha", "--alpha"),
                ("exclude_test", "--exclude-test"), ("probe", "--probe"), ("max_minutes", "--max-minutes"),
                ("chunk_epochs", "--chunk-epochs"), ("sim_cache", "--sim-cache"),
                ("sim_maps_per_session", "--sim-maps-per-session"), ("init", "--init"),
                ("weights_dtype", "--weights-dtype"))
#: What ``--resume`` takes besides the checkpoint (everything else is the checkpoint's).
_RESUME_OPTIONS = ("out", "max_minutes", "chunk_epochs")


def cli_command(args) -> str:
    """The ``python -m opdcells pretrain`` command line that repeats a run (every option spelt out).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    str
        The command, shell-quoted.
    """
    parts = ["python", "-m", "opdcells", "pretrain", *_given_options(args)]
    return " ".join(shlex.quote(p) for p in parts)


def _given_options(args, keys=None) -> list[str]:
    """The flags and values of the options of ``args`` that were given (of ``keys`` only, if given)."""
    parts = []
    for key, flag in _CLI_OPTIONS:
        value = getattr(args, key, None)
        if (keys is not None and key not in keys) or value is None or value == [] or (key == "probe"
                                                                                      and not value):
            continue
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return parts


def resume_command(args) -> str:
    """The ``python -m opdcells pretrain --resume`` command line of a chunk (recorded in the run).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    str
        The command, shell-quoted.
    """
    parts = ["python", "-m", "opdcells", "pretrain", "--resume", str(args.resume),
             *_given_options(args, _RESUME_OPTIONS)]
    if args.export_only:
        parts.append("--export-only")
    return " ".join(shlex.quote(p) for p in parts)


def _check_resume_options(args) -> None:
    """ConfigError unless ``--out`` (new run) or ``--resume`` (only with the options a chunk may change)."""
    from .errors import ConfigError

    if args.resume is None:
        if args.out is None:
            raise ConfigError("--out", "required: the encoder folder to write (or --resume CHECKPOINT_DIR)")
        if args.export_only:
            raise ConfigError("--export-only", "needs --resume CHECKPOINT_DIR")
        return
    fixed = [flag for key, flag in _CLI_OPTIONS if key not in _RESUME_OPTIONS
             and getattr(args, key) != args.option_defaults[key]]
    if fixed:
        raise ConfigError("--resume", "continues the run with the settings its checkpoint records; "
                                      f"leave out {', '.join(fixed)}")


def run(args) -> int:
    """Run the ``pretrain`` command: pretrain (or resume), then print where the encoder went and its probes.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed options.

    Returns
    -------
    int
        Exit status 0.

    Raises
    ------
    ConfigError
        Neither ``--out`` nor ``--resume``, or ``--resume`` with settings of the run.
    """
    _check_resume_options(args)
    import_tensorflow(args.verbose)
    from .pretrain import pretrain, probe_labels, resume_pretraining

    verbose = 0 if args.quiet else 2
    if args.resume is not None:
        result = resume_pretraining(args.resume, max_minutes=args.max_minutes, chunk_epochs=args.chunk_epochs,
                                    workers=args.workers, out=args.out, export_only=args.export_only,
                                    command=resume_command(args), verbose=verbose)
    else:
        result = pretrain(args.data, backbone=args.backbone, method=args.method, out=args.out,
                          epochs=args.epochs, input_size=args.input_size, n_sim=args.n_sim, seed=args.seed,
                          batch_size=args.batch_size, learning_rate=args.lr, alpha=args.alpha,
                          exclude_test=args.exclude_test, n_probe=args.probe, max_minutes=args.max_minutes,
                          chunk_epochs=args.chunk_epochs, sim_cache=args.sim_cache,
                          sim_maps_per_session=args.sim_maps_per_session, workers=args.workers,
                          init=args.init, weights_dtype=args.weights_dtype, command=cli_command(args),
                          verbose=verbose)
    cfg = result.config
    print(f"{result.folder}: {cfg['method']} {cfg['backbone']}, epoch {cfg['epochs_run']} of "
          f"{cfg['epochs']}, {cfg['steps']} steps, final loss {cfg['final_loss']:.4f}, {cfg['time_s']:.0f} s")
    if cfg["epochs_run"] < cfg["epochs"] and cfg.get("checkpoint"):
        print(f"  unfinished: python -m opdcells pretrain --resume {cfg['checkpoint']}")
    if cfg.get("probe"):
        for label, key in probe_labels(cfg):
            for task, probe in cfg["probe"][key].items():
                print(f"  probe {label}, {task}: linear accuracy {probe['linear']['accuracy']:.3f}, "
                      f"k-NN accuracy {probe['knn']['accuracy']:.3f}")
    return EXIT_OK
