"""Named ranges in profiler traces: the pipeline's actions and exchanges, the gradient buckets, the TP collectives.

    with trace_range("F mb3 c0"):                 # a string
        ...
    with trace_range(lambda: describe(sends)):    # or a function building the name, called only while profiling

While torch.profiler records (logging.profile, train/profiler.py), each range is a torch.profiler.record_function,
a "user_annotation" event in the Chrome trace that tools/plot.py --timeline reads back. Otherwise it costs one
check: torch's record_function enters the dispatcher even with no profiler running (about 10 us a range on a
2-core CPU), so it is only built when `torch.autograd._profiler_enabled()` says a profiler listens (0.4 us).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

_NO_RANGE = contextlib.nullcontext()


def trace_range(name: str | Callable[[], str] | None):
    """A record_function range named `name` (or name()) while a profiler records; a no-op context otherwise, and
    always for None (a pass that has nothing worth naming)."""
    if name is None or not torch.autograd._profiler_enabled():
        return _NO_RANGE
    return torch.profiler.record_function(name() if callable(name) else name)
