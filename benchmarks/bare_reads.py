"""The reads ``profile()`` makes at every step, made bare: a reference for what measuring a step costs at least.

``hook_floor.py`` installs ``profile()``'s hooks doing nothing: what seeing a
step costs. ``BareReads`` installs the same kinds of hooks (on the root module,
each output node, each trainable parameter, the optimizer) and does in them
only the reads whose figures a report of the step is made of, with none of
``profile()``'s bookkeeping (no phases or timeline of its own, no saved-tensor
hooks, no module stack, no checks of step boundaries, no notes):

* each forward: its call's signature and the model's modes (``call_signature``
  and ``mode_signature``, what a forward must match to be taken as a repeat of
  one measured), and the tensors of its output, each output node hooked;
* each gradient as it is accumulated: its storage (identity and bytes), kept
  once per storage;
* each backward's end: every gradient's storage (their bytes);
* each optimizer step: the identities of the optimizer's state before and
  after (``state_fingerprint``), the host's resident memory at the start of the
  forward, the backward and the step.

It is not a profiler: it measures no activations (every forward after the
first is a repeat in ``profile()`` too) and keeps one small record a step. The
instruction benchmark (``instructions.py``) sets it beside ``profile()`` and
the floor: what these reads cost is what any tool that reads a step's memory
figures at every step pays, however lean its bookkeeping.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from profiler.tracking.host_rss import HostRss
from profiler.tracking.optimizers import state_fingerprint
from profiler.tracking.repeats import call_signature, mode_signature
from profiler.tracking.saved_tensors import memory_map, memory_of, tensors_in


class BareReads:
    """``with BareReads(model, optimizer):`` a step's reads and nothing more (see the module).

    ``records``: one per step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.modules = list(model.modules())
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.records: list[dict[str, Any]] = []
        self.record: dict[str, Any] | None = None
        self.signatures: dict[Any, int] = {}
        self._seen: dict[Any, int] = {}
        self._handles: list[Any] = []
        self._rss: HostRss | None = None

    def __enter__(self) -> BareReads:
        self._rss = HostRss()
        self._handles = [
            self.model.register_forward_pre_hook(self._forward_begins, with_kwargs=True),
            self.model.register_forward_hook(self._forward_ended, always_call=True),
            self.optimizer.register_step_pre_hook(self._optimizer_begins),
            self.optimizer.register_step_post_hook(self._optimizer_ended),
        ]
        self._handles += [p.register_post_accumulate_grad_hook(self._gradient) for p in self.parameters]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._rss is not None:
            self._rss.close()

    def _open(self) -> dict[str, Any]:
        if self.record is None:
            self.record = {
                "began_at": time.perf_counter(),
                "gradient_events": [],
                "optimizer_state_before": state_fingerprint(self.optimizer),
            }
            self._seen = {}
        return self.record

    def _forward_begins(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not torch.is_grad_enabled():
            return
        record = self._open()
        record.setdefault("forward_rss", self._rss.read())
        signature = (call_signature(args, kwargs), mode_signature(self.modules, self.parameters))
        record["original"] = self.signatures.setdefault(signature, len(self.signatures))

    def _forward_ended(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.record is None:
            return
        for t in tensors_in(output):
            if t.grad_fn is not None:
                t.grad_fn.register_prehook(self._reached)

    def _reached(self, grad_outputs: Any) -> None:
        record = self.record
        if record is None or record.get("in_backward"):
            return
        record["in_backward"] = True
        record.setdefault("backward_rss", self._rss.read())
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        record = self.record
        record["in_backward"] = False
        record["gradients"] = sum(memory_map([p.grad for p in self.parameters if p.grad is not None]).values())

    def _gradient(self, param: torch.Tensor) -> None:
        record = self.record
        if record is None or param.grad is None:
            return
        ident, nbytes = memory_of(param.grad)
        if ident not in self._seen:
            self._seen[ident] = nbytes
            record["gradient_events"].append((time.perf_counter(), nbytes))

    def _optimizer_begins(self, *args: Any) -> None:
        if self.record is not None:
            self.record["optimizer_rss"] = self._rss.read()

    def _optimizer_ended(self, *args: Any) -> None:
        record, self.record = self.record, None
        if record is not None:
            record["optimizer_state_after"] = state_fingerprint(self.optimizer)
            record["ended_at"] = time.perf_counter()
            self.records.append(record)
