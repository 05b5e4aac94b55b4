"""Where a rank's memory goes: parameters, gradients, optimizer state, and the peak of a training step.

Parameters, gradient buffers and optimizer state are counted from the tensors themselves. The step's peak (the
activations kept for backward plus the temporaries around them) comes from CUDA's allocator statistics on a GPU.
On CPU, where torch keeps no such statistics, `AllocationTracker` counts it: a dispatch mode that sees every
tensor an operator creates, adds its storage's bytes while the storage lives, and keeps the maximum. It slows
the operators it watches, so the trainer runs it for the first step only.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


class AllocationTracker(TorchDispatchMode):
    """Bytes of the storages created inside the block that are still alive (`live`), and their maximum (`peak`).
    Storages that existed before (parameters, gradient buffers, optimizer state) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}  # storage address -> a weak reference that reports its release

    def _released(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # An output that shares an input's storage (a view, an in-place write, a collective on a buffer)
        # allocated nothing, whether or not that storage was made inside the block.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _real(t)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not _real(tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._alive or key in inputs or storage.nbytes() == 0:
                continue
            nbytes = storage.nbytes()
            # torch keeps a storage's Python object alive as long as the storage, so the weak reference
            # dies exactly when the memory is released.
            self._alive[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._released(key, nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def _real(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type != "meta"


@contextlib.contextmanager
def step_peak(device: torch.device):
    """Measure the peak bytes a block allocates beyond what was allocated when it started: yields a dict whose
    "peak_bytes" is filled in when the block ends."""
    result = {"peak_bytes": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    else:
        tracker = AllocationTracker()
        with tracker:
            yield result
        result["peak_bytes"] = tracker.peak


@dataclass
class MemoryReport:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    peak_step_bytes: int  # activations and temporaries at the step's peak

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"parameters {self.params_bytes / MIB:.1f} MiB, gradients {self.grads_bytes / MIB:.1f} MiB, "
            f"optimizer state {self.optimizer_bytes / MIB:.1f} MiB, peak activations {self.peak_step_bytes / MIB:.1f} "
            f"MiB"
        )


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
