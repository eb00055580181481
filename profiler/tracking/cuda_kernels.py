"""CUDA's fused kernels where the CPU's keep other tensors for backward.

Two operators take a path on the CPU that a CUDA step does not, and save far
more for backward there (``aten/src/ATen/native/Dropout.cpp``,
``transformers/attention.cpp``):

- ``dropout``: CUDA runs the fused ``native_dropout`` and saves a bool mask
  (1 byte an element); the CPU multiplies by a noise tensor of the input's
  dtype and saves that (4 bytes an element in fp32).
- ``scaled_dot_product_attention`` with ``dropout_p > 0``: CUDA's flash and
  memory-efficient kernels apply dropout inside and save the output and the
  log-sum-exp; the CPU's flash kernel takes no dropout, so the CPU falls back
  to the math path and saves the (batch, heads, seq, seq) attention weights
  and their dropout mask.

While :func:`cuda_kernels` is entered, ``AutogradCPU`` kernels route both as
CUDA would: ``dropout`` through ``native_dropout`` (the same distribution, a
bool mask), and attention with dropout through the CPU's flash kernel, which
has no dropout: those attention layers run without dropout for the measured
steps (counted, and said in the report). Other attention calls take PyTorch's
own composite implementation (``OpOverload.decompose``); dropout that drops
nothing returns its input, as ``at::dropout`` does.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["KernelSwaps", "cuda_kernels"]

_NATIVE_DROPOUT = torch.ops.aten.native_dropout.default
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class KernelSwaps:
    """How many calls took CUDA's path instead of the CPU's (for the report's note)."""

    def __init__(self) -> None:
        self.dropout = 0
        self.attention_without_dropout = 0


@contextlib.contextmanager
def cuda_kernels() -> Iterator[KernelSwaps]:
    """While entered, CPU dropout and attention-with-dropout keep what CUDA's fused kernels keep."""
    swaps = KernelSwaps()

    def dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
        # as at::dropout: the input itself when nothing is dropped, zeros when everything is
        if p == 0 or not train or input.numel() == 0:
            return input
        if p == 1:
            return input * torch.zeros((), dtype=input.dtype, device=input.device)
        swaps.dropout += 1
        return _NATIVE_DROPOUT(input, p, train)[0]

    def attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Any:
        if (
            dropout_p > 0
            and _FLASH_CPU is not None
            and attn_mask is None
            and not enable_gqa
            and query.dim() == key.dim() == value.dim() == 4
        ):
            swaps.attention_without_dropout += 1
            return _FLASH_CPU.default(query, key, value, 0.0, is_causal, scale=scale)[0]
        return _SDPA.decompose(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            lib.impl("dropout", dropout, "AutogradCPU")
            lib.impl("scaled_dot_product_attention", attention, "AutogradCPU")
        yield swaps
    finally:
        lib._destroy()
