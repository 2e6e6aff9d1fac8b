"""The `wmse` command: pretrain | presets | evaluate | embed | report | compare.

Exit statuses (wmse.errors): 0 done; 1 training diverged: the loss stayed non-finite, or the run ended in a
non-finite state that has no checkpoint (the last finite checkpoint is kept); 2 an error the user can fix (command line, config, data, a file that cannot be
read or written, a full disk, a run directory in use), printed as one line on stderr without a
traceback; 75 stopped by SIGINT/SIGTERM after saving a checkpoint (``--resume`` continues it); 76 a process
of a multi-process run was lost (killed; the last checkpoint is kept); 130 a second Ctrl-C (stopped at once).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_TRAINING_ERROR, EXIT_USAGE, EXIT_WORKER_LOST,
                     RunStopped, TrainingError)


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


def _new_config(preset: str | None, overrides: dict[str, str], config_file: str | None = None):
    """The preset's config; without ``--preset``, the preset a ``--config`` file names, else the paper's recipe
    for ``--dataset`` (said on stderr). The file's fields go on top of the preset (the command line's come last)."""
    from .config import PRESETS, get_preset, parse_value, preset_for_dataset, read_config_file

    fields = read_config_file(config_file) if config_file else {}
    if preset is None and fields.get("preset") in PRESETS:
        preset = fields["preset"]
    if preset is None:
        dataset = parse_value("dataset", overrides["dataset"]) if "dataset" in overrides else fields.get("dataset")
        preset = preset_for_dataset(dataset)
        print(f"wmse pretrain: no --preset given: using {preset}, the W-MSE 2 recipe for "
              f"{'--dataset ' + dataset if dataset else 'CIFAR-10'} (`wmse presets --show {preset}` lists it)",
              file=sys.stderr)
    return get_preset(preset).replace(**fields)


def cmd_pretrain(args, extra: list[str]) -> int:
    from .config import apply_overrides
    from .train import pretrain

    overrides = parse_overrides(extra)
    if args.resume:
        if args.preset or args.config:
            raise UsageError("--resume takes the run's own config; leave out --preset and --config")
        if args.auto_resume:
            raise UsageError("give --auto_resume (the same command continues its --run_name) or --resume RUN, not both")
        cfg = _resume_config(args.resume, overrides)
    else:
        cfg = _new_config(args.preset, overrides, args.config)
    cfg = apply_overrides(cfg, overrides)
    if args.auto_resume and cfg.run_name is None:
        raise UsageError("--auto_resume needs --run_name NAME: the name the same command finds its run by")
    _check_restarts(args)
    if args.nproc is not None and args.nproc != 1:
        from .launch import launch

        return launch(args.nproc, args.argv, cfg, max_restarts=args.max_restarts or 0, run_hint=_run_hint(args, cfg))
    resume = args.resume
    if args.auto_resume:
        from .auto_resume import plan

        planned = plan(cfg)
        if planned is None:  # finished: the note is printed
            return EXIT_OK
        cfg, resume = planned
    pretrain(cfg, resume=resume, allow_data_change=args.allow_data_change)
    return EXIT_OK


def _check_restarts(args) -> None:
    """--max_restarts: the launcher's, and only where the restarted processes find the run's checkpoint."""
    if not args.max_restarts:
        return
    if args.nproc is None or args.nproc == 1:
        raise UsageError("--max_restarts needs --nproc K (under torchrun, give torchrun's --max_restarts)")
    if not (args.auto_resume or args.resume):
        raise UsageError("--max_restarts needs --auto_resume (or --resume RUN): the restarted processes must "
                         "continue from the run's checkpoint")


def _run_hint(args, cfg) -> str:
    """How to continue this command's run, for the launcher's message when a process is lost."""
    if args.auto_resume:
        return "the same command (--auto_resume)"
    if args.resume:
        return f"wmse pretrain --resume {args.resume}"
    if cfg.run_name:
        return f"wmse pretrain --resume {Path(cfg.out_dir) / cfg.run_name}"
    return "wmse pretrain --resume RUN"


def cmd_presets(args, extra: list[str]) -> int:
    from .config import describe_presets, get_preset

    if extra:
        raise UsageError(f"unexpected arguments {extra}")
    if args.write and not args.show:
        raise UsageError("--write needs --show NAME: the preset to write")
    if args.write:
        from .config import write_config_file

        print(f"preset {args.show} written to {write_config_file(get_preset(args.show), args.write)} "
              f"(run it with: wmse pretrain --config {args.write})")
    elif args.show:
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


def cmd_compare(args, extra: list[str]) -> int:
    from .compare import compare_runs, format_markdown

    _no_extra(extra)
    runs, files = compare_runs(args.runs, args.out, warn=lambda m: print(f"wmse compare: warning: {m}", file=sys.stderr))
    print(format_markdown(runs), end="")
    for name, path in files.items():
        print(f"{name:<10} {path}")
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
    p.add_argument("--config", metavar="FILE", help="a run's config.json or a JSON/YAML file of fields: the base "
                   "(on top of --preset, else of the preset the file names), command-line fields on top")
    p.add_argument("--auto_resume", "--auto-resume", dest="auto_resume", action="store_true",
                   help="with --run_name: continue that run from its checkpoint if it exists (the same command "
                        "again: requeued jobs, torchrun restarts), start it if not")
    p.add_argument("--nproc", type=_positive_int, default=None, help="launch this many processes with torchrun (DDP)")
    p.add_argument("--max_restarts", "--max-restarts", dest="max_restarts", type=int, default=0,
                   help="with --nproc: restart the process group this many times after a process died "
                        "(needs --auto_resume or --resume)")
    p.add_argument("--allow_data_change", "--allow-data-change", action="store_true",
                   help="with --resume: continue although the data differ from those the run trained on")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("presets", help="list the presets, or show one with --show NAME")
    p.add_argument("--show", metavar="NAME")
    p.add_argument("--write", metavar="FILE", help="with --show NAME: write the preset's fields to FILE (.json, "
                   ".yaml) for `wmse pretrain --config FILE`")
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
    p = sub.add_parser("compare", help="one table (Markdown, CSV) and one kNN plot of several runs")
    p.add_argument("runs", nargs="+", help="run directories, or folders of runs")
    p.add_argument("--out", help="folder for compare.md / .csv / .png (default: compare/ beside the runs)")
    p.set_defaults(func=cmd_compare)
    return parser


def _os_error(err: OSError) -> str:
    """One line naming the path and the cause of a failed read or write."""
    where = err.filename or ""
    cause = err.strerror or str(err)
    return f"cannot write or read {where}: {cause}" if where else cause


def _run(args, extra: list[str]) -> tuple[int, str | None]:
    """Run the command: (exit status, the one line for stderr or None)."""
    try:
        return args.func(args, extra), None
    except (UsageError, ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        return EXIT_USAGE, f"wmse {args.command}: error: {msg}"
    except OSError as err:  # a disk that is full or read-only, a path that is not a directory
        return EXIT_USAGE, f"wmse {args.command}: error: {_os_error(err)}"
    except TrainingError as err:
        return EXIT_TRAINING_ERROR, f"wmse {args.command}: training stopped: {err}"
    except RunStopped as err:
        return EXIT_STOPPED, f"wmse {args.command}: {err}"
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, "interrupted"
    except RuntimeError as err:
        from .launch import is_lost_peer

        if not is_lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return EXIT_WORKER_LOST, (f"wmse {args.command}: lost another process of the run ({first[:200]}); "
                                  "the last checkpoint is kept")


def _say(status: int, line: str | None) -> None:
    """The command's last line: to the launcher of `--nproc` (which prints one for the group), else stderr; of
    a run stopped by a signal under torchrun, rank 0 alone says it (every rank stops alike)."""
    from .launch import report

    if report(status, line) or line is None:
        return
    if status == EXIT_STOPPED and int(os.environ.get("RANK", "0")) != 0:
        return
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # the launcher re-runs this command line under torchrun
    status, line = _run(args, extra)
    _say(status, line)
    return status


if __name__ == "__main__":
    sys.exit(main())
