"""Which implementation a fused op runs: our CUDA kernels, apex (layer norm only), or plain torch.

model.fused_kernels picks the policy:
    auto  our kernels for CUDA tensors they support, built on first use; when the build fails or the call is outside
          what they support (see `unsupported`), apex's layer norm if apex imports, else torch. Never an error.
    on    our kernels or a KernelUnavailableError saying why (CPU tensors, a failed build, an unsupported shape).
    off   plain torch everywhere.
Each op logs its choice the first time it makes it, with the reason when it falls back.
"""

from __future__ import annotations

import functools

import torch

from megagpt.errors import UserError
from megagpt.kernels.build import ExtensionSpec, KernelBuildError, load_extension
from megagpt.log import get_logger

FUSED_MODES = ("auto", "on", "off")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

CUDA_KERNELS = ExtensionSpec(
    name="megagpt_cuda_kernels",
    sources=("binding.cpp", "softmax.cu", "layernorm.cu"),
    cuda=True,
    cflags=("-O3",),
    cuda_cflags=("-O3", "-std=c++17"),
)


class KernelUnavailableError(UserError):
    """model.fused_kernels=on, but our kernels cannot serve this call."""


@functools.cache
def _load() -> tuple[object | None, str | None]:
    """(module, None), or (None, why not); a failed build is tried once per process."""
    if torch.version.cuda is None:
        return None, f"this torch ({torch.__version__}) is built without CUDA, so CUDA extensions cannot build"
    try:
        return load_extension(CUDA_KERNELS), None
    except KernelBuildError as e:
        return None, str(e)


def cuda_kernels():
    """The built extension module (megagpt/kernels/csrc/binding.cpp), or KernelBuildError."""
    module, error = _load()
    if module is None:
        raise KernelBuildError(error)
    return module


@functools.cache
def _apex_layer_norm():
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
    except ImportError:
        return None
    return fused_layer_norm_affine


_announced: set[tuple[str, str, str | None]] = set()


def _announce(op: str, choice: str, reason: str | None) -> None:
    if (op, choice, reason) not in _announced:
        _announced.add((op, choice, reason))
        get_logger().info(f"{op}: using {choice}" + (f" ({reason})" if reason else ""))


def choose(op: str, tensor: torch.Tensor, fused: str, unsupported: str | None, apex: bool = False) -> str:
    """'cuda', 'apex' or 'torch' for one call of `op` on `tensor`. `unsupported` is why our kernels cannot take this
    call even on CUDA (dtype, size), or None; apex: whether apex has this op."""
    if fused not in FUSED_MODES:
        raise ValueError(f"fused={fused!r}; choose one of {', '.join(FUSED_MODES)}")
    if fused == "off":
        _announce(op, "torch", "model.fused_kernels=off")
        return "torch"
    reason = None
    if not tensor.is_cuda:
        reason = f"the tensors are on {tensor.device.type}, and the kernels are CUDA only"
    elif unsupported:
        reason = unsupported
    else:
        module, reason = _load()
        if module is not None:
            _announce(op, "megagpt CUDA kernels", None)
            return "cuda"
    if fused == "on":
        raise KernelUnavailableError(f"model.fused_kernels=on but {op} cannot use megagpt's CUDA kernels: {reason}")
    if apex and tensor.is_cuda and _apex_layer_norm() is not None:
        _announce(op, "apex", reason)
        return "apex"
    _announce(op, "torch", reason)
    return "torch"


def dtype_unsupported(*tensors: torch.Tensor) -> str | None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        return f"mixed dtypes {sorted(map(str, dtypes))}"
    (dtype,) = dtypes
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype}; the kernels take float32, float16 and bfloat16"
    return None
