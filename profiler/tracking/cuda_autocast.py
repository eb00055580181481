"""CUDA's autocast policy, applied to a step that runs on the CPU.

A GPU projection must start from what a CUDA step creates and saves, and
autocast decides much of that: which operators run in fp16/bf16, which are
upcast to fp32, and so which dtype each saved tensor has. CPU and CUDA autocast
wrap different operators (``aten/src/ATen/autocast_mode.cpp``): the CPU casts
``cross_entropy_loss`` to fp32 as a whole, CUDA lets it decompose and casts its
``log_softmax`` (keeping a dtype the caller set) and ``nll_loss``, so a CUDA
step saves one more fp16 (batch x seq x vocab) tensor than the CPU's. CUDA also
runs ``layer_norm``, ``softmax``, ``exp``, ``sum`` and others in fp32.

While :func:`cuda_autocast_policy` is entered, the ``AutocastCPU`` dispatch key
runs CUDA's kernels instead of the CPU's: the operators of CUDA's lists get a
Python kernel with CUDA's cast policy (and its cast cache of fp32 leaf weights),
every other operator the CPU wraps falls through. The tables below are copied
from PyTorch's ``AT_FORALL_*`` lists (``aten/src/ATen/autocast_mode.h``); a test
checks them against the operators that carry an ``AutocastCUDA`` kernel in the
installed torch. Nothing changes outside an autocast region (the key is off).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["CUDA_AUTOCAST_POLICY", "cuda_autocast_policy", "cuda_autocast_ops"]

_LOW = "lower_precision_fp"
_FP32 = "fp32"
_SET_OPT = "fp32_set_opt_dtype"
_APPEND = "fp32_append_dtype"
_PROMOTE = "promote"
_BANNED = "banned"

# Operator (overload) -> policy, from AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE and
# AT_FORALL_PROMOTE, plus the CUDA-only cudnn convolutions and the banned
# binary_cross_entropy.
CUDA_AUTOCAST_POLICY: dict[str, str] = {
    **{
        op: _LOW
        for op in (
            "_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d "
            "conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm "
            "mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell "
            "_thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell "
            "_scaled_dot_product_flash_attention scaled_dot_product_attention cudnn_convolution "
            "cudnn_convolution_transpose"
        ).split()
    },
    **{
        op: _FP32
        for op in (
            "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar "
            "pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm rms_norm group_norm "
            "frobenius_norm.dim nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss "
            "cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss "
            "huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss "
            "triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm "
            "logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d "
            "_upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d "
            "upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d "
            "_upsample_bicubic2d_aa"
        ).split()
    },
    **{
        op: _SET_OPT
        for op in (
            "prod prod.dim_int prod.dim_Dimname softmax.int softmax.Dimname log_softmax.int log_softmax.Dimname "
            "cumprod cumprod.dimname cumsum cumsum.dimname linalg_vector_norm linalg_matrix_norm "
            "linalg_matrix_norm.str_ord sum sum.dim_IntList sum.dim_DimnameList"
        ).split()
    },
    "norm.Scalar": _APPEND,
    "norm.ScalarOpt_dim": _APPEND,
    "norm.names_ScalarOpt_dim": _APPEND,
    **{
        op: _PROMOTE
        for op in "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add".split()
    },
    "binary_cross_entropy": _BANNED,
}

# fp32_append_dtype redispatches to the overload that takes a dtype.
_APPEND_TARGET = {
    "norm.Scalar": "norm.ScalarOpt_dtype",
    "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
    "norm.names_ScalarOpt_dim": "norm.names_ScalarOpt_dim_dtype",
}


def _op(name: str) -> Any | None:
    """``torch.ops.aten.<name>.<overload>``, or None when this torch lacks it."""
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


def _wrapped_by(key: str) -> set[str]:
    """aten operators with a kernel for dispatch key ``key`` in the installed torch (``aten::`` dropped)."""
    return {
        name.removeprefix("aten::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    }


def cuda_autocast_ops() -> set[str]:
    """Operators with an ``AutocastCUDA`` kernel in the installed torch (``aten::`` dropped)."""
    return _wrapped_by("AutocastCUDA")


class _Casts:
    """``cached_cast`` of ``autocast_mode.cpp``: eligible CPU floating tensors, fp32 leaf weights cached."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    @staticmethod
    def eligible(t: Any) -> bool:
        return (
            isinstance(t, torch.Tensor)
            and t.device.type == "cpu"
            and t.is_floating_point()
            and t.dtype != torch.float64
        )

    def cast(self, to: torch.dtype, arg: Any) -> Any:
        if isinstance(arg, (list, tuple)) and any(isinstance(a, torch.Tensor) for a in arg):
            return type(arg)(self.cast(to, a) for a in arg)
        if not self.eligible(arg) or arg.dtype == to:
            return arg
        cacheable = (
            to == torch.get_autocast_dtype("cpu")
            and arg.dtype == torch.float32
            and arg.requires_grad
            and arg.is_leaf
            and not arg._is_view()
            and torch.is_autocast_cache_enabled()
        )
        if not cacheable:
            return arg.to(to)
        hit = self.cache.get(id(arg))
        if hit is not None and hit[0]() is arg:
            return hit[1]
        out = arg.to(to)
        self.cache[id(arg)] = (weakref.ref(arg), out)
        return out

    def promote_type(self, args: Any) -> torch.dtype:
        current = torch.get_autocast_dtype("cpu")
        for a in _tensors(args):
            if self.eligible(a) and torch.float32 in (current, a.dtype):
                current = torch.float32
        return current


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


_EXCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _kernel(name: str, op: Any, policy: str, casts: _Casts) -> Any:
    """A Python kernel for the ``AutocastCPU`` key doing what CUDA's wrapper for ``op`` does."""
    if policy == _SET_OPT:
        names = [a.name for a in op._schema.arguments]
        dtype_at = names.index("dtype") if "dtype" in names else None
    if policy == _APPEND:
        target = _op(_APPEND_TARGET[name])

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            if policy in (_LOW, _FP32, _PROMOTE):  # every floating input cast to one dtype
                if policy == _LOW:
                    to = torch.get_autocast_dtype("cpu")
                elif policy == _FP32:
                    to = torch.float32
                else:
                    to = casts.promote_type([*args, *kwargs.values()])
                return op(*(casts.cast(to, a) for a in args), **{k: casts.cast(to, v) for k, v in kwargs.items()})
            if policy == _SET_OPT:
                if args and casts.eligible(args[0]) and dtype_at is not None:
                    if dtype_at < len(args):
                        if args[dtype_at] is None:
                            args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1 :])
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            if policy == _APPEND:
                out_type = torch.float32 if args and casts.eligible(args[0]) else args[0].dtype
                return target(*args, *kwargs.values(), out_type)
            raise RuntimeError(
                "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast "
                "(CUDA's autocast refuses them); use binary_cross_entropy_with_logits"
            )

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While entered, CPU autocast regions cast as CUDA's autocast would.

    The kernels are registered on a ``torch.library.Library`` and removed on
    exit, when the previous (CPU) kernels are in force again. The cast cache is
    dropped when the outermost autocast region exits, as CUDA's is.
    """
    casts = _Casts()
    lib = torch.library.Library("aten", "IMPL")
    original_clear = torch.clear_autocast_cache

    def clear() -> None:
        casts.cache.clear()
        original_clear()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in _wrapped_by("AutocastCPU") - set(CUDA_AUTOCAST_POLICY):
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
            for name, policy in CUDA_AUTOCAST_POLICY.items():
                op = _op(name)
                if op is not None and (policy != _APPEND or _op(_APPEND_TARGET[name]) is not None):
                    lib.impl(name, _kernel(name, op, policy, casts), "AutocastCPU")
        torch.clear_autocast_cache = clear
        yield
    finally:
        torch.clear_autocast_cache = original_clear
        casts.cache.clear()
        lib._destroy()
