"""The `mmlm` command line: thin subcommands that call the library. Bad input exits 2 with one line."""

import argparse
import importlib
import sys
from collections.abc import Sequence

from mmlm.errors import InputError

# One module per subcommand (or group of subcommands), in the order `mmlm --help` lists them; each module
# has `register(subparsers)`. Shared model arguments live in mmlm.cli.model_args.
COMMAND_MODULES = (
    "mmlm.cli.similarity",
    "mmlm.cli.classify",
    "mmlm.cli.train",
    "mmlm.cli.demo",
    "mmlm.cli.eval",
    "mmlm.cli.index",
    "mmlm.cli.shard",
    "mmlm.cli.chat",
    "mmlm.cli.budget",
    "mmlm.cli.study",
    "mmlm.cli.score",
    "mmlm.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mmlm", description="multimodal language models: load, score, train, evaluate"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"mmlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
