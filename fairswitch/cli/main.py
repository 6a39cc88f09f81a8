"""Entry point of the ``fairswitch`` console script."""

from __future__ import annotations

import argparse
import logging
import sys

from fairswitch import __version__
from fairswitch.cli import bench, generate, replay, run_batch, serve, steps


class _FullHelp(argparse.Action):
    """``fairswitch --help`` documents every option of every command, not just their names."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        for name, sub in parser._commands.items():  # type: ignore[attr-defined]
            print(f"\n{'=' * 80}\nfairswitch {name}\n{'=' * 80}")
            sub.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairswitch", add_help=False,
        description="fairswitch: a fairness-aware, preemptive LLM serving engine.")
    parser.add_argument("-h", "--help", action=_FullHelp, help="show this help (all commands)")
    parser.add_argument("--version", action="version", version=f"fairswitch {__version__}")
    parser.add_argument("--log-level", type=str.lower, choices=serve.LOG_LEVELS, default=None,
                        help="logging verbosity (default: warning; serve: info)")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser._commands = {  # type: ignore[attr-defined]
        "generate": generate.add_parser(subs),
        "serve": serve.add_parser(subs),
        "bench": bench.add_parser(subs),
        "replay": replay.add_parser(subs),
        "run-batch": run_batch.add_parser(subs),
        "steps": steps.add_parser(subs),
    }
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=(args.log_level or "warning").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # bad input, missing files, unreachable servers
        print(f"fairswitch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
