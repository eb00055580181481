"""Measure what the training steps of one model really hold in memory.

Cheap observations only, read at boundaries (the approach of
``torch/utils/module_tracker.py``, not of a dispatch-level tracker). The
tracker owns one part per thing observed, each behind its own interface (the
way torch's MemTracker owns a ModTracker): ``calls`` (the module-call stack),
``saved_hooks`` (our pair on autograd's saved-tensor hook stack), ``ledger``
(saved storages and gradients on the step's timeline), ``phases`` (spans,
CUDA events, allocator reads), ``optimizers`` (which optimizer steps the
model) and ``outputs`` (backward reaching a forward's output).

What stays here is the step state machine: when a step begins and ends,
which forwards and backward passes belong to it. A step ends at the
optimizer's ``step()``; when the script updates weights by hand (no optimizer
seen), it ends where the next training forward begins, or when tracking
stops.

Every hook is removed by ``stop()``, which ``profile.__exit__`` and the runner
call in ``finally`` blocks, so exceptions and KeyboardInterrupt leave no hook
(one exception in form only: see ``optimizers.drop_retired_hooks``).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import guarded
from .backward_watch import OutputWatch
from .ledger import Ledger
from .module_calls import ModuleCalls
from .optimizers import OptimizerWatch
from .parallel import ParallelWatch
from .parameters import ModelParameters
from .phases import PhaseClock
from .repeats import RepeatBook
from .saved_hooks import PASS_ON, SavedHooks
from .saved_tensors import NOT_PACKED, tensors_in
from .step_record import ForwardSaves, StepRecord, enough_steps, trained

__all__ = ["StepState", "StepTracker", "model_device"]

# Forwards of one open step with no backward, each keeping its graph alive (an
# EMA copy's evaluation loss kept in a variable): after this many the model is
# taken for one that is only run, and its forwards are let go of.
FORWARDS_WITHOUT_BACKWARD_LIMIT = 32


class StepState(enum.Enum):
    """Where the open step is."""

    IDLE = "idle"  # no step open
    FORWARD = "forward"  # a root forward of the model is running
    AFTER_FORWARD = "after_forward"  # forward returned; the loss is computed, no backward yet
    BACKWARD = "backward"  # a backward pass through the model's output is running
    AFTER_BACKWARD = "after_backward"  # backward ended; the optimizer step, or the next micro-batch, comes


_FORWARDING = (StepState.FORWARD, StepState.AFTER_FORWARD)


def model_device(parameters: list[nn.Parameter]) -> torch.device:
    """The device of the model's first parameter with a shape, else the CPU."""
    for p in parameters:
        return p.device
    return torch.device("cpu")


def _no_buckets(path: str, state: str) -> str:
    return "other"


class StepTracker:
    """Hooks that measure the first ``max_steps`` training steps of one model.

    The runner passes ``hold_model=False``: a model the script drops (an
    evaluation loop over checkpoints, folds shorter than --steps) must be
    freed as in a plain run. Nothing else here refers to it strongly: the
    hooks are global and filtered by module, and the optimizer hooks refer to
    this tracker only. Its owner stops a tracker whose model is gone.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        max_steps: int | None = None,
        sample_interval: float | None = 0.01,
        bucket_of: Callable[[str, str], str] | None = None,
        on_finished: Callable[[StepTracker], None] | None = None,
        live_peak: bool = False,
        hold_model: bool = True,
        hooks_host: Any = None,
        rebucket: Callable[[dict[str, int]], Callable[[str, str], str]] | None = None,
        project: bool = False,
        reuse_repeats: bool = True,
    ) -> None:
        self.parameters = ModelParameters(model, hold=hold_model)
        self.max_steps = max_steps
        self.steps: list[StepRecord] = []
        self.notes: list[str] = []
        self.finished = False
        self.forwards_without_backward = 0  # forwards left out of the steps: no backward went through them
        self.backward_passes_discarded = 0  # passes left out: their gradients were cleared without a step
        self._on_finished = on_finished
        self._rebucket = rebucket  # the bucket resolver for the order the modules were seen to run in
        self.step: StepRecord | None = None  # the step being measured now, if one is open
        self._state = StepState.IDLE
        self._running = False
        self._stop_requested = False  # an internal error inside an optimizer pre-hook: stop at the next forward
        self._backward_task = -1  # autograd's id of the backward call running the step's backward pass
        self._seq_floor = -1  # the highest autograd node number among the running root forward's inputs
        self._thread = threading.get_ident()

        self.device = model_device(self.parameters.shaped())
        self.calls = ModuleCalls(
            self,
            model,
            bucket_of or _no_buckets,
            self.notes,
            hooks_host,
            foreign_saved_hooks=lambda: self.saved_hooks.foreign_pair_on_top(),
        )
        self.optimizers = OptimizerWatch(self, self.parameters.ids, optimizer, self.notes)
        self.ledger = Ledger(
            self.parameters,
            self.device,
            current_step=self._measured_step,
            locate=self.calls.where,
            fail=self.fail,
        )
        self.saved_hooks = SavedHooks(self, self.ledger)
        self.parallel = ParallelWatch()  # the rank and wrapper, under torchrun
        self.phases = PhaseClock(
            self.device, sample_interval=sample_interval, live_peak=live_peak, notes=self.notes, project=project
        )
        self.outputs = OutputWatch(self._output_reached)
        # Forwards that repeat a measured one are taken as it (repeats.py); a live-tensor count or a trace sees all.
        self.repeats = RepeatBook(reuse_repeats and not self.phases.live_peak and not self.ledger.fsdp)
        self.notes += self.parameters.devices_note(self.device)

    # ------------------------------------------------------------ what it holds
    @property
    def model(self) -> nn.Module | None:
        """The model measured; None once released, or once the script dropped it (``hold_model=False``)."""
        return self.parameters.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizers.optimizer

    def _measured_step(self) -> StepRecord | None:
        """The open step while measuring, else None (what the ledger counts into)."""
        return self.step if self._running else None

    @property
    def measuring(self) -> bool:
        """Hooks are installed and measuring (between ``start()`` and ``stop()``)."""
        return self._running

    # ------------------------------------------------------------ lifecycle
    def start(self) -> StepTracker:
        if self._running:
            return self
        if isinstance(self.model, torch.jit.ScriptModule):
            self.notes.append(
                "TorchScript module: PyTorch runs no Python hooks on it, so its steps are not measured "
                "(its parameters are counted)"
            )
            self.finished = True
            return self
        self._running = True
        try:
            self.parallel.look()
            self.optimizers.adopt_running_step()
            self.parameters.take_storages()
            self.parameters.watch()
            self.calls.install()
            self.ledger.hook_gradients()
            self.optimizers.install()
            # Read now, not in the first step: parameters (stale until watched) and the optimizer's state count.
            self.parameters.refresh()
            self.optimizers.state()
            self.phases.start(self.parameters.shaped())
        except Exception as exc:  # noqa: BLE001 - reported; the training runs unmeasured
            self.fail("start", exc)
        except BaseException:
            self.stop()  # never leave half the hooks behind
            raise
        return self

    def fail(self, where: str, exc: Exception) -> None:
        """Our own error inside a hook: note it and stop measuring, leaving training alone."""
        self.notes.append(f"measuring stopped after an internal error in {where}: {type(exc).__name__}: {exc}")
        self.step = None  # the open step is unreliable: drop it
        if self.optimizers.in_pre_hooks:
            # Not while torch loops over the pre-hooks (deleting ours would raise
            # in the script): at the next forward. In a post-hook stop() retires ours.
            self._stop_requested = True
            return
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - hooks are gone or going; nothing more to save
            pass

    def stop(self) -> None:
        """Remove every hook, close the open step and stop the sampler. Idempotent."""
        if not self._running:
            return
        self._running = False
        step = self.step
        if self._open_step_unused() or (
            # Forwards with no backward after training steps (an evaluation kept
            # in a variable), or several and never a backward: a model evaluated
            # with gradients on whose last loss the script keeps alive.
            self._only_forwards() and not step.optimizer_steps and (step.forwards > 1 or self.trained)
        ):
            self._drop_unused_step()  # (a check after the last step, say: print(model(x).mean().item()))
        try:
            self._finish_step()
            self.parallel.take_layout(self.model, self.optimizer)
        finally:
            self.saved_hooks.pop()
            self.optimizers.remove()
            self.calls.remove()
            self.ledger.unhook_gradients()
            self.parameters.unwatch()
            self.outputs.remove()
            self.phases.stop()
            for step in self.steps:
                step.settle()
            self.finished = True

    def release(self) -> None:
        """Stop, then let go of the model and its optimizer (their figures were taken out)."""
        self.stop()
        self.optimizers.optimizer = None
        self.parameters.release()

    def _done(self) -> None:
        """Enough steps: remove the hooks and tell the owner (the runner may stop the script)."""
        self.stop()
        if self._on_finished is not None:
            self._on_finished(self)

    # ------------------------------------------------------------- what it saw
    @property
    def measured_all_steps(self) -> bool:
        """As many steps as asked for were measured (always False without a limit)."""
        return self._enough_steps()

    @property
    def trained(self) -> bool:
        """A backward through the model's output, or its optimizer's step, was seen in a measured step."""
        return trained(self.steps + ([self.step] if self.step is not None else []))

    @property
    def never_trained(self) -> bool:
        """No backward went through it, and a forward's graph was freed unused: a model only run, not trained."""
        if self.trained:
            return False
        step = self.step
        return step is None or any(f.graph_freed for f in step.open_forwards)

    @property
    def started_measuring(self) -> bool:
        """A training step of this model was seen (it is measuring or has measured).

        Forwards whose graph was freed with no backward (a model only evaluated
        with gradients on, a teacher whose output is detached) are no training.
        """
        return bool(self.steps) or (self.step is not None and not self._open_step_unused())

    def _enough_steps(self) -> bool:
        return enough_steps(self.steps, self.max_steps)

    # ----------------------------------------------------------------- steps
    def _begin_step(self) -> bool:
        """Open a new step; False once enough steps were measured."""
        if self._enough_steps():
            self._done()
            return False
        self.parameters.refresh()
        self.parallel.look()
        if self.parameters.lazy_left:  # lazy parameters that got their shapes since
            self.ledger.hook_gradients()
            self.parameters.adopt_materialized()
        step = StepRecord(index=len(self.steps) + 1)
        step.started_at = time.perf_counter()
        self.ledger.begin_step(step)
        if self.optimizer is not None:
            step.optimizer_state_before = self.optimizers.state()[0]
        self.phases.begin_step(step)
        self.step = step
        self.calls.step_begins()
        return True

    def _finish_step(self, skipped: bool | None = None) -> None:
        """Close the open step and add it to ``steps`` (``skipped``: already found out, else found here)."""
        step = self.step
        if step is None:
            return
        if self.optimizers.in_step:  # its step() raised: the post-hook never ran
            step.optimizer_failed = True
            self.optimizers.end_step()
        elif self._state is StepState.AFTER_BACKWARD:
            # Measuring ends on an iteration that may have skipped its step (the
            # next forward, which would tell, never comes).
            if skipped is None:
                skipped = self.optimizers.skipped(step, self.parameters)
            if skipped and self._gradients_discarded():
                self._discard_step()
                return
        self.saved_hooks.pop()
        self.phases.end_open(step)
        step.seconds = time.perf_counter() - step.started_at
        # A backward that began and never ended raised: that step is not complete.
        step.complete = step.forwards > 0 and step.backwards > 0 and self._state is not StepState.BACKWARD
        step.fold(self.calls.bucket_of)
        if self.optimizer is not None and not step.optimizer_steps:
            self.optimizers.take_state(step)
        self.steps.append(step)
        self.step = None
        self._state = StepState.IDLE

    def _gradients_discarded(self) -> bool:
        """The skipped step trained nothing: no GradScaler skipped it, and the optimizer stepped before.

        A GAN's discriminator, backpropagated through by the generator's loss,
        then zeroed before its own next step: no training step of its own.
        """
        return not self.step.optimizer_skipped and any(s.optimizer_steps for s in self.steps)

    def _discard_step(self) -> None:
        """Leave out the open step, whose gradients were cleared without an optimizer step, with a note."""
        self.backward_passes_discarded += self.step.backwards
        self.saved_hooks.pop()
        self.step, self._state = None, StepState.IDLE

    def _only_forwards(self) -> bool:
        """The open step has had forwards and no backward yet."""
        step = self.step
        return step is not None and self._state is StepState.AFTER_FORWARD and not step.backwards

    def _open_step_unused(self) -> bool:
        """The open step's forwards had no backward and their graphs are gone: no training step at all."""
        forwards = self.step.open_forwards if self.step is not None else []
        return (
            self._only_forwards()
            and not self.optimizers.in_step
            and bool(forwards)
            and all(f.graph_freed for f in forwards)
        )

    def _drop_unused_step(self) -> None:
        """Leave out the open step, forwards whose graph was freed unused (``_open_step_unused``), with a note."""
        self.forwards_without_backward += self.step.forwards
        self.saved_hooks.pop()  # (another model's step, or a loss after the next forward, is not ours to see)
        self.step, self._state = None, StepState.IDLE

    # ------------------------------------------------------- root forwards
    def root_forward_begins(self, args: Any, kwargs: dict | None = None) -> None:
        """A root forward of the model begins (told by the module-call stack)."""
        # (as tensors_in((args, kwargs)) finds them, without the pair: positional arguments are most calls)
        inputs = tensors_in(args, 1) + tensors_in(kwargs, 1) if kwargs else tensors_in(args, 1)
        step = self.step
        if step is not None and self._state is StepState.BACKWARD and torch._C._current_graph_task_id() != -1:
            # Backward recomputing a checkpointed model: part of that backward, not a
            # forward. (Reentrant checkpointing ran the first forward under no_grad,
            # unseen: its recomputation, with no step open, is the step's forward.)
            step.checkpointing = True
            return
        if self._stop_requested:
            self._done()
            return
        if self.optimizers.in_step and not self.optimizers.step_running():
            # Its step() raised and the script went on: that iteration is over.
            self._finish_step()
            self.optimizers.end_step()  # also with no step open
        if self.step is None and self._running and self._enough_steps():
            self._done()  # the first forward after the last measured step, evaluation included
            return
        if not torch.is_grad_enabled() or not self._running or torch._C._get_tracing_state() is not None:
            return  # evaluation forwards (and torch.jit.trace's) are not training steps
        if not self.parameters.any_trainable():
            return  # a frozen model (a teacher) run with gradients on: nothing of it trains
        self._end_step_before_next_forward()
        if self._open_step_unused() or (
            self._only_forwards()
            and not self.optimizers.in_step
            and self.step.forwards >= FORWARDS_WITHOUT_BACKWARD_LIMIT
        ):
            # The forward before had no backward and its graph is gone: a shape
            # check, a summary or a loss printed with gradients on. Not part of a
            # training step (its batch is often another size): measured afresh.
            self._drop_unused_step()
        if self.step is None and not self._begin_step():
            return
        step = self.step
        if torch._C._current_graph_task_id() != -1:
            step.checkpointing = True  # a forward run by backward: a reentrant checkpoint's recomputation
        if step.forwards:
            self.ledger.release_cleared_gradients(step)  # (gradient accumulation: the next micro-batch begins)
        alone = self._state in (StepState.IDLE, StepState.AFTER_BACKWARD)  # no other forward awaits its backward
        forward = step.begin_forward()
        self._state = StepState.FORWARD
        self.phases.begin(step, "forward")
        # Measured tensor by tensor (our pair pushed), or taken as a repeat of one measured (repeats.py).
        model = self.model
        call = (args, kwargs, [model, *self.parameters.parts] if model is not None else [], self.parameters.shaped())
        if self.repeats.begin(forward, step, call, inputs, alone, self.saved_hooks.clear):
            self.calls.skip_repeat()
        else:
            # Autograd nodes numbered above the inputs' were made by this forward (see Ledger.count_function_ctx).
            self._seq_floor = max((t.grad_fn._sequence_nr() for t in inputs if t.grad_fn is not None), default=-1)
            self.saved_hooks.push()
            self.repeats.measured(forward, self.saved_hooks.outer is None and not self.saved_hooks.peers)

    def _end_step_before_next_forward(self) -> None:
        """A training forward after a backward: the step before is over, or this is its next micro-batch.

        A forward inside ``optimizer.step()`` is a closure (LBFGS re-evaluating
        the loss): part of this step, like a gradient-accumulation micro-batch.
        A pass that accumulated no ``.grad`` was ``torch.autograd.grad`` (a
        gradient penalty's): the step goes on, the next forward is one more of it.
        """
        if not (
            self.step is not None
            and self._state is StepState.AFTER_BACKWARD
            and not self.optimizers.in_step
            and self.ledger.accumulated  # (the last backward pass accumulated a parameter's .grad)
        ):
            return
        # A step ended without an optimizer step: weights updated by hand (no
        # optimizer: the step is over), or a GradScaler that skipped step() while
        # its scale settles. Only an optimizer that exists can tell the two apart.
        self.optimizers.find_once()
        if self.optimizer is None:
            self._finish_step(skipped=False)
        elif self.optimizers.skipped(self.step, self.parameters):
            self._finish_step(skipped=True)

    def root_forward_ends(self, output: Any) -> None:
        """A root forward of the model returned ``output`` (told by the module-call stack)."""
        step = self.step
        if step is None or self._state is not StepState.FORWARD:
            return
        forward, self.calls.skip_inside, outputs = step.current_forward, False, tensors_in(output)
        self.repeats.forward_ends(forward, step, outputs)
        if forward.original is None and self.saved_hooks.balanced:
            # The script's own pair is below ours: it pops the top one when its
            # `with` ends, so ours must be gone by then. What a loss computed
            # after this forward saves goes to the script's hooks unseen.
            self.saved_hooks.pop()
            if self.saved_hooks.outer is not None:
                step.saves_after_forward_unseen = True
        self._state = StepState.AFTER_FORWARD
        fns = {id(t.grad_fn): t.grad_fn for t in outputs if t.grad_fn is not None}
        forward.watched = bool(fns)
        forward.graph = [self.outputs.watch(fn, forward) for fn in fns.values()]
        self.ledger.forward_returned(forward)
        if forward.original is None:
            self.ledger.count_function_ctx(step, list(fns.values()), self._seq_floor)
        else:
            self.ledger.repeat_returned(forward)

    @guarded
    def run_order_known(self, order: dict[str, int]) -> None:
        """The first training forward showed the order the modules run in: buckets follow it from now on."""
        if self._rebucket is not None:
            self.calls.bucket_of = self._rebucket(order)

    @property
    def forwarding(self) -> bool:
        """A root forward of the model is running (not yet returned)."""
        return self._state is StepState.FORWARD

    # ------------------------------------------------------------- backward
    @guarded
    def _output_reached(self, forward: ForwardSaves) -> None:
        """Backward reached one of ``forward``'s outputs: a backward pass begins, or it is one more it goes through.

        Each forward of a step is watched because which ones a backward goes
        through tells what was alive at once and what is no part of the step
        at all (see ``StepRecord.fold``). A backward that reaches a forward
        that an earlier backward of the step did not (one loss backpropagated
        per view) is a backward pass of its own.
        """
        step = self.step
        forwards = step.open_forwards if step is not None else []
        if not (forwards and forwards[-1] is forward) and not any(f is forward for f in forwards):
            return
        task = torch._C._current_graph_task_id()
        if not (self._state is StepState.BACKWARD and task == self._backward_task):  # (else: one more it reaches)
            if self._state is StepState.BACKWARD:  # (the last one's end was not seen: a backward that raised)
                self._backward_end()
            # A new backward call: the first through this step's outputs, one per
            # view, or another loss on a graph an earlier call retained.
            self._backward_task = task
            self._backward_begin()
            step.pass_of_task[task] = step.backwards
        if forward.reached_by is None:
            forward.reached_by, forward.reached_at = step.backwards, time.perf_counter()
        if forward.original is not None:
            self.repeats.reached(forward, step.backwards, task)

    def _backward_begin(self) -> None:
        step = self.step
        self._state = StepState.BACKWARD
        self.ledger.accumulated = False
        step.backwards += 1
        self.ledger.release_cleared_gradients(step)
        self.phases.begin(step, "backward")
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    @guarded
    def _backward_end(self) -> None:
        step = self.step
        if step is None or self._state is not StepState.BACKWARD:
            return
        self.ledger.count_gradients(step)
        self.ledger.release_at_backward_end()
        self._state = StepState.AFTER_BACKWARD
        self.repeats.backward_ended(step)  # (what this pass reached and freed may be repeated from now on)

    # ------------------------------------------------ the optimizer's steps
    def optimizer_step_begins(self, opt: torch.optim.Optimizer, adopted: bool) -> None:
        """A step of an optimizer of the model begins (told by the optimizer watch)."""
        if adopted and self.step is not None and self.steps and not any(s.optimizer_steps for s in self.steps):
            # The optimizer shows up only now: the steps so far (a backward, then a new
            # forward, looked like a hand-written update) were micro-batches of this one.
            self.phases.end_open(self.step)  # (the last backward is still open: closed on this step)
            self.step.fold(self.calls.bucket_of)
            self.steps, self.step = [], self.step.merge(self.steps)
        step = self.step
        if step is None:
            return
        self.saved_hooks.pop()
        self.ledger.count_gradients(step)
        if step.optimizer_state_before == 0 and not step.optimizer_steps:
            step.optimizer_state_before = self.optimizers.state(opt)[0]
        self.phases.begin(step, "optimizer")

    def optimizer_step_ended(self, opt: torch.optim.Optimizer) -> None:
        """The model's optimizer's ``step()`` returned (told by the optimizer watch)."""
        step = self.step
        if step is None:
            return
        self.phases.end(step, "optimizer")
        step.optimizer_steps += 1
        self.optimizers.take_state(step, opt)
        if step.optimizer_state != step.optimizer_state_before:
            step.events.append(
                (time.perf_counter(), "optimizer_state", step.optimizer_state - step.optimizer_state_before)
            )
        self._finish_step()
        if self._enough_steps():
            # Done now, not at the next forward: a model trained exactly these
            # steps may never run again, and the runner lets it go once done.
            # (stop() retires our post-hook rather than deleting it.)
            self._done()

    # --------------------------------------------- saved tensors (HooksOwner)
    @guarded
    def observe_saved(self, t: torch.Tensor, packed: Any = NOT_PACKED) -> Any:
        """Count a saved tensor: the storage pointer counted for it in this forward, None, or ``PASS_ON``.

        (Unpacking it releases it on the timeline; its holder tells the
        ledger when autograd lets go of it.)
        """
        if not self._running or self.model is None:
            self.saved_hooks.pop()  # measuring ended where our pair could not be popped, or the model was dropped
            return None
        step = self.step
        # Only what the forward (and a loss computed after it) saves: tensors
        # saved while backward recomputes a checkpointed segment are transient.
        if step is None or self._state not in _FORWARDING or threading.get_ident() != self._thread:
            return None
        if self._state is StepState.AFTER_FORWARD and step.current_forward.graph_freed:
            # No loss can be built on an output whose graph is gone: this is
            # another model's forward, or a loss of its own, under our pair.
            if self._open_step_unused():
                self._drop_unused_step()
            return PASS_ON
        if self._state is StepState.AFTER_FORWARD and self.calls.in_another_model():
            return PASS_ON  # another model's forward, not a loss on ours
        step.saved_tensors += 1
        step.current_forward.n_saved += 1
        return self.ledger.observe(step, t, packed)
