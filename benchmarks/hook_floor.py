"""The hooks ``profile()`` needs to see a training step, each doing nothing: a floor for its overhead.

``profile()`` learns of a step's events from PyTorch's hooks. Any tool built
that way pays for the hooks themselves before it does any work in them:
PyTorch's slow path through ``nn.Module.__call__`` while a global module
hook exists, a Python call per saved tensor and per accumulated gradient,
a prehook on each forward's output node, a callback at the end of backward,
and the optimizer's step hooks. ``HookFloor`` installs the same hooks at the
same points and for as long as ``profile()`` keeps them, each returning at
once, so the benchmark can say how much of the overhead is the hooks and how
much is what is done in them:

* the first forward of a block (measured in full by ``profile()``): a global
  module pre-hook and an always-called forward hook on every module call, and
  a saved-tensor hook pair whose pack saves a detached alias (as autograd
  itself would) and whose unpack hands it back, on until the optimizer's step
  or the next forward (its loss's saves too);
* every forward (those after the first are taken as repeats, with no global
  hook): a pre-hook and an always-called forward hook on the root module,
  and a prehook on each output node, which queues a callback for the end of
  backward;
* every parameter that trains: a post-accumulate-grad hook;
* the optimizer: a step pre-hook and post-hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks


def _nothing(*args: Any) -> None:
    return None


def _detached(t: torch.Tensor) -> torch.Tensor:
    """The least a pack hook must do: a detached alias (``t`` itself would make a reference cycle)."""
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class HookFloor:
    """``with HookFloor(model, optimizer):`` the hooks of ``profile()``, doing nothing (see the module)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self._handles: list[Any] = []
        self._global: list[Any] = []
        self._saved_hooks: Any = None
        self._first = True

    def __enter__(self) -> HookFloor:
        self._global = [
            module_hooks.register_module_forward_pre_hook(_nothing),
            module_hooks.register_module_forward_hook(_nothing, always_call=True),
        ]
        self._handles = [
            self.model.register_forward_pre_hook(self._root_pre),
            self.model.register_forward_hook(self._root_post, always_call=True),
            self.optimizer.register_step_pre_hook(self._optimizer_pre),
            self.optimizer.register_step_post_hook(_nothing),
        ]
        self._handles += [
            p.register_post_accumulate_grad_hook(_nothing) for p in self.model.parameters() if p.requires_grad
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pop_saved_hooks()
        self._global_off()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        self._pop_saved_hooks()  # (the first forward's pair, kept on for its loss, as profile() keeps its own)
        if self._first:
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(_detached, _same)
            self._saved_hooks.__enter__()
            self._first = False

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._global_off()  # (the first forward is over: later ones run as repeats, with no global hook)
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.grad_fn.register_prehook(self._reached)

    def _optimizer_pre(self, *args: Any) -> None:
        self._pop_saved_hooks()

    def _pop_saved_hooks(self) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    def _global_off(self) -> None:
        for handle in self._global:
            handle.remove()
        self._global = []

    @staticmethod
    def _reached(grad_outputs: Any) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(_nothing)
