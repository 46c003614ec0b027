"""The `rsavq` command line. Only this package prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rsavq import __version__
from rsavq.cli import eval as eval_cmd
from rsavq.cli import fisher, generate, quantize
from rsavq.errors import RsavqError, UsageError

logger = logging.getLogger("rsavq")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsavq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rsavq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    eval_cmd.add_parser(sub)
    fisher.add_parser(sub)
    quantize.add_parser(sub)
    generate.add_parsers(sub)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"rsavq: error: {exc}", file=sys.stderr)
        return 2
    except RsavqError as exc:
        print(f"rsavq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rsavq: interrupted", file=sys.stderr)
        return 130
