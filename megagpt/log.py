"""One rank-aware logger for the library: rank 0 speaks by default, every line carries the rank coordinates."""

from __future__ import annotations

import logging
import sys

_LOGGER_NAME = "megagpt"


def setup_logging(rank: int = 0, coords: tuple[int, int, int] = (0, 0, 0), all_ranks: bool = False) -> None:
    """Configure the megagpt logger for this process; ranks other than 0 only log warnings unless all_ranks."""
    tp, dp, pp = coords
    logger = logging.getLogger(_LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[megagpt r{rank} tp{tp} dp{dp} pp{pp}]" if rank or all_ranks else "[megagpt]"
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    logger.propagate = False


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER_NAME)
