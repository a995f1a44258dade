"""What train.py and test.py share on the command line: common flags and clean error exits."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from trainer.checkpoint import CheckpointError
from utils.config import ConfigError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --set overrides, and the legacy launcher's --local_rank / --local-rank."""
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config key, value parsed as JSON, e.g. --set trainer.no_epochs=2 "
                             "(repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(main: Callable[[], object]) -> None:
    """Run an entry point; bad input ends it with a one-line message instead of a traceback."""
    try:
        main()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
