"""The `wmse` command: pretrain | presets | evaluate | embed | report.

Errors a user can cause (unknown preset or field, bad value, missing data or checkpoint) print one line
on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TrainingError


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


def cmd_pretrain(args, extra: list[str]) -> int:
    from .checkpoint import load_checkpoint
    from .config import Config, apply_overrides, get_preset
    from .train import pretrain

    overrides = parse_overrides(extra)
    if args.resume:
        cfg = Config.from_dict(load_checkpoint(args.resume)["config"])
        if args.preset:
            raise UsageError("--resume takes the run's own config; leave out --preset")
    else:
        cfg = get_preset(args.preset or "quick")
    cfg = apply_overrides(cfg, overrides)
    if args.nproc and args.nproc > 1:
        from .launch import launch

        return launch(args.nproc, sys.argv[1:])
    pretrain(cfg, resume=args.resume)
    return 0


def cmd_presets(args, extra: list[str]) -> int:
    from .config import describe_presets, get_preset

    if extra:
        raise UsageError(f"unexpected arguments {extra}")
    if args.show:
        for key, value in get_preset(args.show).to_dict().items():
            print(f"{key:<20} {value}")
    else:
        print(describe_presets())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wmse", description="W-MSE self-supervised learning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain an encoder; any config field can be given as --field value",
                       epilog="Example: wmse pretrain --preset cifar10-wmse4 --data_dir ~/data --epochs 200")
    p.add_argument("--preset", help="named configuration (see `wmse presets`); default: quick")
    p.add_argument("--resume", help="run directory or checkpoint to continue exactly where it stopped")
    p.add_argument("--nproc", type=int, default=None, help="launch this many processes with torchrun (DDP)")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("presets", help="list the presets, or show one with --show NAME")
    p.add_argument("--show", metavar="NAME")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.func(args, extra)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"wmse {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"wmse {args.command}: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
