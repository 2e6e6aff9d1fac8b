"""The `wmse` command: pretrain | presets | evaluate | embed | report.

Exit statuses (wmse.errors): 0 done; 1 training diverged: the loss stayed non-finite, or the run ended in a
non-finite state that has no checkpoint (the last finite checkpoint is kept); 2 an error the user can fix (command line, config, data, a file that cannot be
read or written, a full disk, a run directory in use), printed as one line on stderr without a
traceback; 75 stopped by SIGINT/SIGTERM after saving a checkpoint (``--resume`` continues it); 130 a
second Ctrl-C (stopped at once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_TRAINING_ERROR, EXIT_USAGE, RunStopped,
                     TrainingError)


class UsageError(ValueError):
    """A mistake on the command line."""


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """["--lr", "1e-3", "--epochs=5"] -> {"lr": "1e-3", "epochs": "5"}; dashes in names become underscores."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UsageError(f"unexpected argument {tok!r}; config overrides look like --field value")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise UsageError(f"--{name} needs a value")
            value = tokens[i + 1]
            i += 1
        out[name.replace("-", "_")] = value
        i += 1
    return out


# Fields that say where a new run goes: a resumed run stays where it is.
_NEW_RUN_ONLY = ("out_dir", "run_name")


def _resume_config(run: str, overrides: dict[str, str]):
    """The config to resume ``run`` with: the run's own, without the earlier invocation's max_steps and
    max_minutes (stop conditions, not part of the recipe: give them again to set new ones), plus the command
    line's changes."""
    from .checkpoint import read_checkpoint
    from .config import Config

    refused = [f"--{k}" for k in overrides if k in _NEW_RUN_ONLY]
    if refused:
        raise UsageError(f"{', '.join(refused)} cannot change on --resume: the run continues in its own directory")
    return Config.from_dict(read_checkpoint(run).config).replace(max_steps=None, max_minutes=None)


def _new_config(preset: str | None, overrides: dict[str, str]):
    """The preset's config; without ``--preset``, the paper's recipe for ``--dataset`` (said on stderr)."""
    from .config import get_preset, parse_value, preset_for_dataset

    if preset is None:
        dataset = parse_value("dataset", overrides["dataset"]) if "dataset" in overrides else None
        preset = preset_for_dataset(dataset)
        print(f"wmse pretrain: no --preset given: using {preset}, the W-MSE 2 recipe for "
              f"{'--dataset ' + dataset if dataset else 'CIFAR-10'} (`wmse presets --show {preset}` lists it)",
              file=sys.stderr)
    return get_preset(preset)


def cmd_pretrain(args, extra: list[str]) -> int:
    from .config import apply_overrides
    from .train import pretrain

    overrides = parse_overrides(extra)
    if args.resume:
        if args.preset:
            raise UsageError("--resume takes the run's own config; leave out --preset")
        cfg = _resume_config(args.resume, overrides)
    else:
        cfg = _new_config(args.preset, overrides)
    cfg = apply_overrides(cfg, overrides)
    if args.nproc is not None and args.nproc != 1:
        from .launch import launch

        return launch(args.nproc, args.argv, cfg)
    pretrain(cfg, resume=args.resume, allow_data_change=args.allow_data_change)
    return EXIT_OK


def cmd_presets(args, extra: list[str]) -> int:
    from .config import describe_presets, get_preset

    if extra:
        raise UsageError(f"unexpected arguments {extra}")
    if args.show:
        values = get_preset(args.show).to_dict()
        width = max(map(len, values))  # prefixed method fields are longer than the run's
        for key, value in values.items():
            print(f"{key:<{width}} {value}")
    else:
        print(describe_presets())
    return 0


def _no_extra(extra: list[str]) -> None:
    if extra:
        raise UsageError(f"unexpected arguments {extra}")


def cmd_evaluate(args, extra: list[str]) -> int:
    from .trained import evaluate_run

    _no_extra(extra)
    evaluate_run(args.run, dataset=args.dataset, data_dir=args.data_dir, head=args.head,
                 linear=not args.no_linear, linear_epochs=args.linear_epochs, device=args.device)
    return 0


def cmd_embed(args, extra: list[str]) -> int:
    from .trained import embed_run

    _no_extra(extra)
    files = embed_run(args.run, out_dir=args.out, split=args.split, dataset=args.dataset, data_dir=args.data_dir,
                      head=args.head, device=args.device)
    for name, path in files.items():
        print(f"{name:<10} {path}")
    return 0


def cmd_report(args, extra: list[str]) -> int:
    from .report import write_report

    _no_extra(extra)
    run = Path(args.run)
    if not (run / "metrics.jsonl").is_file() and not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.json / metrics.jsonl)")
    print(write_report(run))
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--dataset", help="dataset name (default: the run's)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="data location (default: the run's)")
    p.add_argument("--head", action="store_true", help="use the projection head's output instead of E(x)")
    p.add_argument("--device", default="auto")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit status 2 (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wmse", description="W-MSE self-supervised learning")
    parser.add_argument("--version", action="version", version=f"wmse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("pretrain", help="pretrain an encoder; any config field can be given as --field value",
                       description="Any config field can be given as --field value; `wmse presets --show NAME` "
                                   "lists the fields and their values.",
                       epilog="Example: wmse pretrain --preset cifar10-wmse4 --data_dir ~/data --epochs 200")
    p.add_argument("--preset", help="named configuration (see `wmse presets`); default: quick")
    p.add_argument("--resume", help="run directory or checkpoint to continue exactly where it stopped")
    p.add_argument("--nproc", type=_positive_int, default=None, help="launch this many processes with torchrun (DDP)")
    p.add_argument("--allow_data_change", "--allow-data-change", action="store_true",
                   help="with --resume: continue although the data differ from those the run trained on")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("presets", help="list the presets, or show one with --show NAME")
    p.add_argument("--show", metavar="NAME")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("evaluate", help="kNN (k=5 and weighted k=200) + linear probe of a run's frozen encoder")
    _data_args(p)
    p.add_argument("--linear_epochs", "--linear-epochs", dest="linear_epochs", type=_positive_int, default=None,
                   help="epochs of the linear probe (default: the run's linear_epochs, as its final evaluation)")
    p.add_argument("--no_linear", "--no-linear", dest="no_linear", action="store_true", help="kNN only")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("embed", help="features to .npy (+ labels, paths) and the backbone as safetensors")
    _data_args(p)
    p.add_argument("--split", help="split to embed (default: the run's training split)")
    p.add_argument("--out", help="output folder (default: RUN/embed/SPLIT)")
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("report", help="PNG plots and index.html of a run")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_report)
    return parser


def _os_error(err: OSError) -> str:
    """One line naming the path and the cause of a failed read or write."""
    where = err.filename or ""
    cause = err.strerror or str(err)
    return f"cannot write or read {where}: {cause}" if where else cause


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # the launcher re-runs this command line under torchrun
    try:
        return args.func(args, extra)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"wmse {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a disk that is full or read-only, a path that is not a directory
        print(f"wmse {args.command}: error: {_os_error(err)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as err:
        print(f"wmse {args.command}: training stopped: {err}", file=sys.stderr)
        return EXIT_TRAINING_ERROR
    except RunStopped as err:
        print(f"wmse {args.command}: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
