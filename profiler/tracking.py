"""Measure what one training step of a model really holds in memory.

Cheap observations only, read at boundaries (the approach of
``torch/utils/module_tracker.py``, not of a dispatch-level tracker):

* module forward hooks keep a stack of the module that is running, so every
  tensor autograd saves is charged to the innermost module that saved it;
* a saved-tensors pack hook sees each tensor saved for backward; storages are
  deduplicated (views counted once), parameter storages are left out, and
  autocast's fp16/bf16 copies of the weights (a ``ToCopyBackward`` node on a
  leaf parameter) are their own category rather than "activations";
* a hook on the model output's grad_fn marks the start of backward, and an
  engine callback marks its end, where gradients are counted (one per unique
  storage, so a tied weight has one gradient);
* global optimizer step hooks find the optimizer of this model (no need to be
  told), mark the optimizer phase and count its state per name and group;
* on CUDA the caching allocator's counters are read at module and phase
  boundaries; the peak statistic is reset at phase boundaries so that each
  phase has its own peak. ``empty_cache()`` is never called.

Every hook is removed by ``stop()``, which ``profile.__exit__`` and the runner
call in ``finally`` blocks, so exceptions and KeyboardInterrupt leave no hook.
(One exception in form only: an optimizer post-hook whose tracker finished
while torch iterated those hooks is made a no-op there and its entry deleted
when the block or the script ends; see ``drop_retired_hooks``.)
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.parameter import is_lazy
from torch.optim import optimizer as optimizer_hooks
from torch.utils import checkpoint as torch_checkpoint

from .compiled import compiled_parts, hookable_modules, is_compiled, unwrap_compiled_call, wrap_compiled_call
from .device_clock import DeviceClock
from .module_calls import PROCESS, hide_global_hook_warning, restore_warnings, running_call_kwargs
from .optimizers import find_optimizer, frame_identity, grad_scaler_alive, optimizer_step_on_stack, updates_any
from .saved_tensors import (
    CHECKPOINT_HOLDER,
    NOT_PACKED,
    SavedTensor,
    memory_of,
    storage_key,
    tensors_held,
    tensors_in,
    weight_copy_source,
)
from .step_record import PHASES, ForwardSaves, StepRecord

__all__ = ["StepRecord", "StepTracker", "StopAfterSteps", "OUTSIDE", "drop_retired_hooks", "find_optimizer"]

OUTSIDE = "(outside the model)"  # saved while no module of the model was running
CTX_PATH = "(kept on a custom autograd.Function's ctx)"  # see StepTracker._count_function_ctx
_FUNCTION_NODE = torch.autograd.function.BackwardCFunction
_CHECKPOINT_FUNCTION = getattr(torch_checkpoint, "CheckpointFunction", None)
# A GradScaler halves its scale at every skipped step: 16 skips take the default
# initial scale of 2**16 down to 1, past which overflow is not the scale's doing.
SKIPPED_STEPS_LIMIT = 16
# Forwards of one open step with no backward, each keeping its graph alive (an
# EMA copy's evaluation loss kept in a variable): after this many the model is
# taken for one that is only run, and its forwards are let go of.
FORWARDS_WITHOUT_BACKWARD_LIMIT = 32


# Handles of optimizer post-hooks retired while torch was iterating their dict
# (a tracker that finished inside its own post-hook): a key deleted mid-loop
# raises in the script, so the entry's value became a no-op. The keys go where
# no optimizer step can be running, which only the owner knows: when a
# ``with profile(...)`` block ends, and when the runner's script has ended
# (``drop_retired_hooks``). A step nested in a script's own post-hook (one
# optimizer stepping another) rules out any moment inside the script.
_RETIRED_HOOKS: list[Any] = []


def _retired_hook(*args: Any) -> None:
    """What a retired optimizer hook's entry holds until its key can be removed."""
    return None


def drop_retired_hooks() -> None:
    """Remove the retired entries: call only where no optimizer step is running."""
    while _RETIRED_HOOKS:
        _RETIRED_HOOKS.pop().remove()


def _guarded(method: Callable) -> Callable:
    """Run a hook so that a failure of ours never stops the user's training.

    The error becomes a note in the report and measuring stops. Only
    observations are guarded: what autograd needs back from a pack or unpack
    hook is produced outside them.
    """

    @functools.wraps(method)
    def wrapper(self: "StepTracker", *args: Any) -> Any:
        try:
            return method(self, *args)
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the training loop
            self._fail(method.__name__, exc)
            return None

    return wrapper


COMPILED_NOTE = (
    "torch.compile'd module: what its graphs save for backward is measured (autograd's saved-tensor hooks "
    "run for compiled graphs), but no module hook runs inside it, so it is charged to the compiled "
    "module itself (autocast's weight copies made inside it are counted as activations)"
)


class _GraphToken:
    """Kept alive by a hook on an autograd node, so a weak reference to it dies with the node."""

    __slots__ = ("__weakref__",)


class StopAfterSteps(SystemExit):
    """Raised to end a script once its steps are measured (``--stop-after-steps``)."""

    def __init__(self) -> None:
        super().__init__(0)


class StepTracker:
    """Hooks that measure the first ``max_steps`` training steps of one model.

    A step ends at the optimizer's ``step()``; when the script updates weights
    by hand (no optimizer seen), it ends where the next training forward
    begins, or when tracking stops.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        max_steps: int | None = None,
        sample_interval: float | None = 0.01,
        bucket_of: Callable[[str, str], str] | None = None,
        on_finished: Callable[["StepTracker"], None] | None = None,
        live_peak: bool = False,
        hold_model: bool = True,
        hooks_host: Any = None,
    ) -> None:
        # The runner passes hold_model=False: a model the script drops (an
        # evaluation loop over checkpoints, folds shorter than --steps) must be
        # freed as in a plain run. Nothing else here refers to it strongly: the
        # hooks live on the model's modules, and the global optimizer hooks
        # refer to this tracker only. Its owner stops a tracker whose model is gone.
        self._model_ref: weakref.ref | None = None
        self._model_held: nn.Module | None = None
        self._hold_model = hold_model
        self._hooks_host = hooks_host  # a ModelWatcher whose global hooks call ours (the runner), else None
        self.model = model
        self.live_peak = live_peak
        self._live_counter = None
        self._optimizer_ref: weakref.ref | None = None
        self.optimizer_history: list[str] = []  # every optimizer adopted, in order (a replaced one too)
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.sample_interval = sample_interval
        self.steps: list[StepRecord] = []
        self.notes: list[str] = []
        self._bucket_of = bucket_of or (lambda path, state: "other")
        self._on_finished = on_finished
        self._paths = {}
        for path, mod in model.named_modules(remove_duplicate=False):
            self._paths.setdefault(id(mod), path)
        # Looked up on every module call: which modules are trunk blocks (or inside one).
        self._block_modules = {mid for mid, path in self._paths.items() if self._bucket_of(path, "") == "block"}
        # Every parameter, lazy ones included: one keeps its identity when its
        # first forward gives it a shape (see _adopt_materialized).
        self._param_ids = {id(p) for p in model.parameters()}
        self._param_refs = [weakref.ref(p) for p in {id(p): p for p in model.parameters()}.values()]
        self._lazy_left = any(is_lazy(p) for p in model.parameters())
        self._grad_hooked: set[int] = set()
        self._backward_task = -1  # autograd's id of the backward call running the step's backward pass
        self._pass_accumulated = False  # the last backward pass accumulated a parameter's .grad
        self.forwards_without_backward = 0  # forwards left out of the steps: no backward went through them
        self._seq_floor = -1  # the highest autograd node number among the running root forward's inputs
        self._hooked: set[int] = set()  # ids of the model's modules whose calls are observed (see _install)
        self._warning_filter: tuple | None = None
        self._param_storages: set[int] = set()
        self._handles: list[Any] = []
        self._node_hooks: list[tuple[weakref.ref, Any]] = []  # (token, handle) of our prehooks on output nodes
        self._node_hooks_pruned = 0  # how many were left after the last pruning
        self._stack: list[int] = []
        self._forks = PROCESS.forks  # a forked child (a DataLoader worker) has more: the hooks do nothing there
        self._thread = threading.get_ident()
        self._step: StepRecord | None = None
        self._step_state = "idle"  # idle | forward | after_forward | backward | after_backward
        self._saved_hooks_pushed = False
        self._pair: tuple[Callable, Callable] = (self._pack, self._unpack)  # what is pushed: see _hook_pair
        self._saved_hooks_balanced = False
        self._pushed_in_backward = False  # our pair was pushed while backward ran (see _push_saved_hooks)
        self._outer_hooks: tuple[Callable, Callable] | None = None  # the script's pair below ours
        self._below: tuple[Callable, Callable] | None = None  # the pair right below ours when it was pushed
        self._not_ours = False  # set by _observe_saved: the save is another model's (see _pack)
        self._peers: list[StepTracker] = []  # trackers of this model whose pair is below ours
        self._live: dict[int, tuple[str, int, ForwardSaves]] = {}  # saved storages not yet freed by backward: (category, bytes, forward)
        self._grads_seen: dict[int, int] = {}  # gradient storages on the step's timeline -> bytes
        self._trunk_state = "before"  # where execution is relative to the trunk: before/in/after
        self._running = False
        self._looked_for_optimizer = optimizer is not None
        self._in_optimizer_step = False  # between this model's optimizer's pre- and post-step hooks
        # Which frame runs that step() call: (id, code), never the frame itself,
        # which would keep the caller's locals (a failed attempt's tensors) alive.
        self._optimizer_frame: tuple[int, Any] | None = None
        self._grad_scaler_alive: bool | None = None  # looked up once, at the first step without an optimizer step
        self._stop_requested = False  # an internal error inside an optimizer hook: stop at the next forward
        self._in_post_hooks = False  # torch is iterating its optimizer post-hooks (ours is running)
        self._compiled_calls: list[tuple[weakref.ref, weakref.ref | None]] = []  # (module, our wrapper): see _wrap_compiled_calls
        self.finished = False
        self.sampler = None
        self.device = self._model_device()
        self._cuda = self.device.type == "cuda"
        self.device_clock = DeviceClock(self.device)
        # Compiled modules whose inside spans buckets (a model compiled whole): what
        # they save is measured, but no module hook runs inside to say where.
        self._compiled_mixed = {
            id(m) for path, m in model.named_modules()
            if is_compiled(m) and self._bucket_of(path, "before") != self._bucket_of(path, "after")
        }
        if any(is_compiled(m) for m in model.modules()):
            self.notes.append(COMPILED_NOTE)
        if optimizer is not None and not updates_any(optimizer, self._param_ids):
            self.notes.append(
                f"the optimizer given ({type(optimizer).__name__}) updates none of this model's parameters: "
                "its steps are not this model's, and its state is not counted"
            )
            self.optimizer, self.optimizer_history = None, []
            self._looked_for_optimizer = False  # the right one is found as if none had been given
        devices = {p.device for p in _parameters(model)}
        if len(devices) > 1:
            self.notes.append(
                "parameters on several devices (" + ", ".join(sorted(map(str, devices))) + "); "
                f"allocator figures are for {self.device} only"
            )

    @property
    def model(self) -> nn.Module | None:
        """The model measured; None once released, or once the script dropped it (``hold_model=False``)."""
        return self._model_ref() if self._model_ref is not None else None

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        self._model_ref = weakref.ref(model) if model is not None else None
        self._model_held = model if self._hold_model else None

    @property
    def model_dropped(self) -> bool:
        """The script let go of the model before this tracker did (it was not released)."""
        return self._model_ref is not None and self._model_ref() is None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """This model's optimizer, held weakly: one the script replaces must be freed as without us."""
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    @optimizer.setter
    def optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        previous = self.optimizer
        self._optimizer_ref = weakref.ref(opt) if opt is not None else None
        if opt is not None and opt is not previous:
            self.optimizer_history.append(type(opt).__name__)

    @property
    def optimizer_name(self) -> str | None:
        """The class of the last optimizer this model's steps used (kept when it is freed)."""
        return self.optimizer_history[-1] if self.optimizer_history else None

    # ------------------------------------------------------------------ setup
    def _params(self) -> list[nn.Parameter]:
        """The model's parameters with a shape, or, once the script dropped the model, those still alive.

        ``loss = Net()(x).sum(); loss.backward()``: the module is gone before its
        backward, its parameters live on in the graph, and get gradients.
        """
        model = self.model
        if model is not None:
            return _parameters(model)
        return [p for ref in self._param_refs if (p := ref()) is not None and not is_lazy(p)]

    def _model_device(self) -> torch.device:
        for p in self._params():
            return p.device
        return torch.device("cpu")

    def start(self) -> "StepTracker":
        if self._running:
            return self
        if isinstance(self.model, torch.jit.ScriptModule):
            self.notes.append("TorchScript module: PyTorch runs no Python hooks on it, so its steps are not measured "
                              "(its parameters are counted)")
            self.finished = True
            return self
        self._running = True
        try:
            running = optimizer_step_on_stack(self._param_ids)
            if running is not None and self.optimizer in (None, running[0]):
                # Started inside that step (an LBFGS closure): its forwards are one step.
                self.optimizer, self._optimizer_frame = running[0], frame_identity(running[1])
                self._in_optimizer_step = self._looked_for_optimizer = True
            self._install()
        except Exception as exc:  # noqa: BLE001 - reported; the training runs unmeasured
            self._fail("start", exc)
        except BaseException:
            self.stop()  # never leave half the hooks behind
            raise
        return self

    def _install(self) -> None:
        self._wrap_compiled_calls()
        self._param_storages = {k[0] for p in self._params() if (k := storage_key(p)) is not None}
        # Global hooks, filtered by module: hooks stored on the model's modules
        # would go with it into a deepcopy (an EMA copy), a pickle
        # (torch.save(model)) or torch.jit.script, and break them.
        self._hooked = {id(m) for m in hookable_modules(self.model)}
        if self._hooks_host is not None:  # the runner's watcher: no global hook added or removed (see its listen())
            self._handles.append(self._hooks_host.listen(self._any_module_pre, self._any_module_post))
        else:
            self._handles.append(module_hooks.register_module_forward_pre_hook(self._any_module_pre))
            self._handles.append(module_hooks.register_module_forward_hook(self._any_module_post, always_call=True))
            self._warning_filter = hide_global_hook_warning()
        self._hook_gradients()
        for register, hook, hooks in (
            (optimizer_hooks.register_optimizer_step_pre_hook, self._optimizer_pre, optimizer_hooks._global_optimizer_pre_hooks),
            (optimizer_hooks.register_optimizer_step_post_hook, self._optimizer_post, optimizer_hooks._global_optimizer_post_hooks),
        ):
            handle = register(hook)
            # First in torch's dict, not last: a hook of the script's that removes
            # itself mid-loop is safe only as the last one, as it was without us.
            hooks.move_to_end(handle.id, last=False)
            self._handles.append(handle)
        if self.live_peak:
            from .live import LiveTensorCounter

            self._live_counter = LiveTensorCounter()
            self._live_counter.__enter__()
        if self.sample_interval:
            from .sampler import MemorySampler

            self.sampler = MemorySampler(device=self.device, interval=self.sample_interval, max_samples=20_000)
            self.sampler.start()

    def _wrap_compiled_calls(self) -> None:
        """Call our hooks around the compiled call of the model, or of its parts, compiled in place.

        A module compiled with ``.compile()`` goes straight to its compiled
        ``_call_impl``, where module hooks would be traced by dynamo: ours are
        called around it instead, in eager Python. For the model that is its
        root hooks (steps and phases are seen); a part (``block.compile()``) is
        put on the module stack, so what it saves is charged to it, its bucket
        known (a compiled block is the block bucket). ``stop()`` puts the
        compiled functions back.
        """
        tracker, model = weakref.ref(self), self.model
        modules = [model] if getattr(model, "_compiled_call_impl", None) is not None else []
        for module in modules + compiled_parts(model):

            def before(args: tuple, kwargs: dict, module: nn.Module = module) -> bool | None:
                me = tracker()
                if me is None or me.model is None:
                    return None
                if module is me.model:
                    me._root_pre(module, args, kwargs)
                elif me._step is not None:
                    me._module_pre(module, args)
                else:
                    return None  # as for any part: only a step's calls matter
                return True

            def after(args: tuple, output: Any, token: Any, module: nn.Module = module) -> None:
                me = tracker()
                if me is not None:
                    me._module_post(module, args, output)

            self._compiled_calls.append((weakref.ref(module), wrap_compiled_call(module, before, after)))

    def _hook_gradients(self) -> None:
        """A hook on each trainable parameter with a shape: the timeline's gradient growth."""
        for p in {id(p): p for p in self._params()}.values():
            if p.requires_grad and id(p) not in self._grad_hooked:
                self._grad_hooked.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    def _adopt_materialized(self) -> None:
        """Lazy parameters that got their shapes since: hook them and know their storage."""
        self._hook_gradients()
        self._param_storages |= {k[0] for p in self._params() if (k := storage_key(p)) is not None}
        self._lazy_left = self.model is not None and any(is_lazy(p) for p in self.model.parameters())

    def _leave_live_counter(self) -> None:
        """Leave the dispatch mode if it is still the innermost one (modes must nest)."""
        counter, self._live_counter = self._live_counter, None
        if counter is None:
            return
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is counter and threading.get_ident() == self._thread:
            counter.__exit__(None, None, None)
        else:
            self.notes.append("the live-tensor counter could not be removed in order (another dispatch mode was entered after it)")

    def release(self) -> None:
        """Stop, then let go of the model and its optimizer (their figures were taken out)."""
        self.stop()
        self.model = None
        self.optimizer = None
        self._param_refs = []

    @property
    def measured_all_steps(self) -> bool:
        """As many steps as asked for were measured (always False without a limit)."""
        return self._enough_steps()

    @property
    def trained(self) -> bool:
        """A backward through the model's output, or its optimizer's step, was seen in a measured step."""
        steps = self.steps + ([self._step] if self._step is not None else [])
        return any(s.backwards or s.optimizer_steps for s in steps)

    @property
    def never_trained(self) -> bool:
        """No backward went through it, and a forward's graph was freed unused: a model only run, not trained."""
        if self.trained:
            return False
        step = self._step
        return step is None or any(f.graph_freed for f in step._forwards)

    @property
    def started_measuring(self) -> bool:
        """A training step of this model was seen (it is measuring or has measured).

        Forwards whose graph was freed with no backward (a model only evaluated
        with gradients on, a teacher whose output is detached) are no training.
        """
        return bool(self.steps) or (self._step is not None and not self._open_step_unused())

    def _fail(self, where: str, exc: Exception) -> None:
        """Our own error inside a hook: note it and stop measuring, leaving training alone."""
        self.notes.append(f"measuring stopped after an internal error in {where}: {type(exc).__name__}: {exc}")
        self._step = None  # the open step is unreliable: drop it
        if where == "_optimizer_pre":
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
        step = self._step
        if self._open_step_unused() or (
            # Forwards with no backward after training steps (an evaluation kept
            # in a variable), or several and never a backward: a model evaluated
            # with gradients on whose last loss the script keeps alive.
            step is not None and self._step_state == "after_forward" and not step.backwards
            and not step.optimizer_steps and (step.forwards > 1 or self.trained)
        ):
            self._drop_unused_step()  # (a check after the last step, say: print(model(x).mean().item()))
        if self.forwards_without_backward:
            self.notes.append(
                f"{self.forwards_without_backward} forward(s) with gradients on but no backward (a shape check, a "
                "summary, a loss only printed, a model evaluated with gradients on) were left out of the steps"
            )
        try:
            self._finish_step()
        finally:
            self._pop_saved_hooks()
            post_hooks = optimizer_hooks._global_optimizer_post_hooks
            for h in self._handles:
                if self._in_post_hooks and h.hooks_dict_ref() is post_hooks and h.id in post_hooks:  # (a Listening: None)
                    post_hooks[h.id] = _retired_hook  # not `del`: torch is iterating this dict
                    _RETIRED_HOOKS.append(h)
                else:
                    h.remove()
            self._handles = []
            for _, h in self._node_hooks:  # (on graphs still alive: a probe's output the script kept)
                h.remove()
            self._node_hooks = []
            restore_warnings(self._warning_filter)
            self._warning_filter = None
            for module, wrapper in self._compiled_calls:
                unwrap_compiled_call(module(), wrapper)
            self._compiled_calls = []
            self._leave_live_counter()
            self._stack = []
            self._optimizer_frame = None
            if self.sampler is not None:
                self.sampler.stop()
            self.finished = True

    # ---------------------------------------------------------------- memory
    def _cuda_read(self) -> tuple[int, int, int] | None:
        if not self._cuda:
            return None
        return (
            torch.cuda.memory_allocated(self.device),
            torch.cuda.memory_reserved(self.device),
            torch.cuda.max_memory_allocated(self.device),
        )

    def _phase_begin(self, name: str) -> None:
        """Close the open phase and open ``name``: phases tile the step with no gap.

        Forward runs until backward begins (a loss computed outside the model
        belongs to it), backward until the optimizer step or the next forward
        (gradient unscaling and clipping belong to it), so the step's peak is
        the largest phase peak and nothing between phases escapes.
        """
        step = self._step
        if step is None:
            return
        now = time.perf_counter()
        for other, ph in step.phases.items():
            if ph._start is not None:
                self._phase_end(other, now)
        ph = step.phases[name]
        ph._start = now
        step.phase_spans.setdefault(name, []).append((ph._start, ph._start))
        if self.device_clock.enabled:
            ph._device_spans.append([self.device_clock.mark(), None])
        if self._live_counter is not None:
            self._live_counter.restart_peak()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.sampler is not None:
            self.sampler.mark(f"{step.index}:{name}")

    def _phase_end(self, name: str, now: float | None = None) -> None:
        step = self._step
        if step is None:
            return
        ph = step.phases[name]
        if ph._start is not None:
            now = time.perf_counter() if now is None else now
            ph.seconds += now - ph._start
            spans = step.phase_spans.get(name)
            if spans:
                spans[-1] = (spans[-1][0], now)
            if ph._device_spans and ph._device_spans[-1][1] is None:
                ph._device_spans[-1][1] = self.device_clock.mark()
            ph._start = None
        counter = self._live_counter
        if counter is not None and step.live_start is not None:
            live = step.live_baseline + counter.peak - step.live_start
            ph.live_tensor_peak = max(ph.live_tensor_peak or 0, live)
            step.live_tensor_peak = max(step.live_tensor_peak or 0, live)
        read = self._cuda_read()
        if read is not None:
            allocated, reserved, peak = read
            ph.peak_allocated = max(ph.peak_allocated or 0, peak)
            ph.allocated_end, ph.reserved_end = allocated, reserved
            step.peak_allocated = max(step.peak_allocated or 0, peak)
            step.reserved = max(step.reserved or 0, reserved)

    @staticmethod
    def _unique_bytes(tensors: list[torch.Tensor]) -> int:
        return sum(dict(memory_of(t) for t in tensors).values())

    def _live_gradients(self) -> dict[int, int]:
        """Storage identity -> bytes of every gradient the model's parameters hold now."""
        return dict(memory_of(p.grad) for p in self._params() if p.grad is not None)

    def _release_cleared_gradients(self) -> None:
        """Take gradients that ``zero_grad()`` freed in mid-step off the timeline.

        A script may clear gradients between forward and backward, or in an
        LBFGS closure; the storages seen so far are then gone, and the
        backward that follows allocates new ones.
        """
        step = self._step
        if step is None or not self._grads_seen:
            return
        alive = self._live_gradients()
        gone = [ident for ident in self._grads_seen if ident not in alive]
        if gone:
            now = time.perf_counter()
            step.events.extend((now, "gradients", -self._grads_seen.pop(ident)) for ident in gone)

    def _count_gradients(self) -> None:
        if self._step is not None:
            grads = [p.grad for p in self._params() if p.grad is not None]
            self._step.gradients = max(self._step.gradients, self._unique_bytes(grads))

    def _count_optimizer_state(self, opt: torch.optim.Optimizer) -> tuple[int, dict[str, int], list[int]]:
        group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        seen: set[int] = set()
        by_name: dict[str, int] = defaultdict(int)
        by_group = [0] * len(opt.param_groups)
        for p, state in opt.state.items():
            if id(p) not in self._param_ids:
                continue
            for name, value in state.items():
                # A tensor, or a list of them (LBFGS keeps its history as lists).
                for tensor in tensors_in(value):
                    ident, nbytes = memory_of(tensor)
                    if ident in seen:
                        continue
                    seen.add(ident)
                    by_name[name] += nbytes
                    if id(p) in group_of:
                        by_group[group_of[id(p)]] += nbytes
        return sum(by_name.values()), dict(by_name), by_group

    # ----------------------------------------------------------------- steps
    def _enough_steps(self) -> bool:
        """``max_steps`` steps that updated the weights, or too many GradScaler skips to wait for.

        An iteration whose optimizer step a GradScaler skipped (overflowing fp16
        gradients, common while the loss scale settles) has no optimizer phase
        and shows nothing of the step the user asked about, so it does not
        count; after ``SKIPPED_STEPS_LIMIT`` of them measuring ends anyway.
        An iteration whose ``optimizer.step()`` raised (an out-of-memory error
        the script caught to retry smaller) does not count either.
        """
        if self.max_steps is None:
            return False
        skipped = sum(s.optimizer_skipped or s.optimizer_failed for s in self.steps)
        return len(self.steps) - skipped >= self.max_steps or skipped >= SKIPPED_STEPS_LIMIT

    def _begin_step(self) -> bool:
        """Open a new step; False once enough steps were measured."""
        if self._enough_steps():
            self._done()
            return False
        if self._lazy_left:
            self._adopt_materialized()
        step = StepRecord(index=len(self.steps) + 1)
        step._t0 = time.perf_counter()
        step.parameters = self._unique_bytes(list(self._params()))
        self._grads_seen = self._live_gradients()
        step.gradients_start = sum(self._grads_seen.values())
        self._live = {}
        opt = self.optimizer
        if opt is not None:
            step.optimizer_state_before = self._count_optimizer_state(opt)[0]
        read = self._cuda_read()
        if read is not None:
            step.allocated_start = read[0]
        if self._live_counter is not None:
            step.live_start = self._live_counter.live
            step.live_baseline = step.parameters + step.gradients_start + step.optimizer_state_before
        self._step = step
        self._trunk_state = "before"
        return True

    def _finish_step(self) -> None:
        step = self._step
        if step is None:
            return
        if self._in_optimizer_step:  # its step() raised: the post-hook never ran
            step.optimizer_failed = True
            self._in_optimizer_step, self._optimizer_frame = False, None
        elif (
            self._step_state == "after_backward" and not step.optimizer_steps and self.optimizer is not None
            and self.model is not None and self._gradients_cleared()
        ):
            # Measuring ends on an iteration whose step was skipped (the next
            # forward, which tells otherwise, never comes): as in _root_forward_begin.
            if self._grad_scaler_alive is None:
                self._grad_scaler_alive = grad_scaler_alive()
            step.optimizer_skipped = self._grad_scaler_alive
        self._pop_saved_hooks()
        for name in PHASES:
            if step.phases[name]._start is not None:
                self._phase_end(name)
        step.seconds = time.perf_counter() - step._t0
        # A backward that began and never ended raised: that step is not complete.
        step.complete = step.forwards > 0 and step.backwards > 0 and self._step_state != "backward"
        step.fold()
        if self.optimizer is not None and not step.optimizer_steps:
            total, by_name, by_group = self._count_optimizer_state(self.optimizer)
            step.optimizer_state, step.optimizer_state_by_name, step.optimizer_state_by_group = total, by_name, by_group
        self.steps.append(step)
        self._step = None
        self._step_state = "idle"

    def _done(self) -> None:
        """Enough steps: remove the hooks and tell the owner (the runner may stop the script)."""
        self.stop()
        if self._on_finished is not None:
            self._on_finished(self)

    # ------------------------------------------------------- saved tensors
    def _push_saved_hooks(self) -> None:
        if self._saved_hooks_pushed:
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            # Pairs of other models' trackers above ours that see nothing now
            # (between their steps' forwards: a GAN's discriminator after its
            # backward) are taken off, so this forward's saves come to us; they
            # push theirs again at their next forward.
            _pop_tracker_pairs(
                self._thread, lambda other: other is not self and other._step_state not in ("forward", "after_forward")
            )
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            if not (self._pushed_in_backward and (top is None or top[0] is not self._pair[0])):
                return
            # Pushed while backward ran (a reentrant checkpoint's recomputation): the
            # engine ran it with its own copy of the thread's hooks, gone with it.
            self._saved_hooks_pushed = False
        # If the user already has saved-tensor hooks active (save_on_cpu, a
        # checkpoint), ours must nest strictly inside their context: pop at
        # the end of this forward. Otherwise keep them until the step's
        # backward is done, to see what the loss outside the model saves.
        # Only the innermost pair runs, so theirs is called from ours (_pack).
        # Another model's tracker is passed over (its model is not the one
        # saving), to the script's own pair beneath it, if any.
        # A tracker of this same model (a `with profile(model)` in a script run
        # under `python -m profiler`, or nested blocks) is told of each save too.
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        outer, peers = top, []
        while outer is not None and _tracker_of(outer[0]) is not None:
            other = _tracker_of(outer[0])
            if other is not self and other.model is self.model:
                peers.append(other)
            outer = other._outer_hooks
        self._outer_hooks = outer
        self._peers = peers
        for other in peers:  # and the other way: once our pair is popped, theirs sees the loss
            if self not in other._peers:
                other._peers.append(self)
        # Only the script's own pair pops the top of the stack when its `with`
        # ends; another model's tracker pops its pair only when it is on top,
        # so above one of those ours stays for the loss (it is this model's).
        self._saved_hooks_balanced = outer is not None
        self._below = top
        pack, unpack = self._hook_pair()
        torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
        self._saved_hooks_pushed = True
        self._pushed_in_backward = torch._C._current_graph_task_id() != -1

    def _hook_pair(self) -> tuple[Callable, Callable]:
        """The pack and unpack hooks to push: ours, kept out of dynamo once it is loaded.

        Autograd calls them from inside compiled code too (what a compiled
        graph saves is seen); dynamo must not compile them into the script's
        graphs (nor recompile for every tensor shape), so they are wrapped in
        ``torch._dynamo.disable``. Without dynamo imported no code is compiled,
        and importing it for nothing would change the script's process.
        """
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and not hasattr(self._pair[0], "__wrapped__"):
            self._pair = (dynamo.disable(self._pack), dynamo.disable(self._unpack))
        return self._pair

    def _pop_saved_hooks(self) -> None:
        """Pop our pair of saved-tensor hooks if it is the innermost one on this thread.

        The pair lives on the thread that pushed it. When measuring ends
        elsewhere (on CUDA, backward and its callbacks run on autograd's device
        thread) or under a pair the user pushed later, it cannot be popped
        here; ``_pack`` then pops it the next time it runs with measuring over.
        """
        if not self._saved_hooks_pushed or threading.get_ident() != self._thread:
            return
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is not None and top[0] is self._pair[0]:
            torch._C._autograd._pop_saved_tensors_default_hooks()
            self._saved_hooks_pushed = False
            # A pair of another model's tracker under ours that stopped meanwhile
            # (it could not pop it from beneath ours) goes with ours.
            _pop_tracker_pairs(self._thread, lambda other: not other._running)

    def _pack(self, t: torch.Tensor) -> "SavedTensor":
        """Autograd saves ``t`` for backward: note it, then save it as autograd would have.

        Only one pair of saved-tensor hooks runs, the innermost, so a pair the
        script pushed before ours (``save_on_cpu``, a lossy compressor) is
        called from here: the training is the same with us as without.
        Without one, what is saved is a detached alias (returning ``t`` itself
        would make a reference cycle through its grad_fn, see
        ``torch.autograd.graph.saved_tensors_hooks``) with ``t``'s version,
        checked at unpack: with hooks installed autograd no longer checks
        whether a saved tensor was modified in place, so we do.
        """
        outer = self._outer_hooks
        packed = NOT_PACKED
        if outer is not None:
            packed = outer[0](t)
            saved = SavedTensor(packed, None, outer[1], self._observe_saved(t, packed))
        else:
            ptr = self._observe_saved(t)
            below = self._below
            if self._not_ours and below is not None and _tracker_of(below[0]) is not None:
                # Our forward's graph is gone: what is saved now is the loss of a
                # model whose pair is below ours (a teacher run with gradients on
                # inside a student's step). Ours is popped; this one is its.
                self._not_ours = False
                return below[0](t)
            saved = SavedTensor(t.detach(), t._version, None, ptr)
        self._not_ours = False
        if saved.ptr is not None:
            # Told when autograd lets go of it (SavedTensor.__del__): used by
            # backward, or its graph dropped unused before any backward.
            forward = self._step._current
            forward.holders[saved.ptr] = forward.holders.get(saved.ptr, 0) + 1
            saved.forward, saved.tracker = forward, self
        if self._peers:
            saved.peers = tuple((peer, peer._observe_saved(t, packed)) for peer in self._peers)
        return saved

    def _unpack(self, saved: "SavedTensor") -> torch.Tensor:
        """Backward uses a saved tensor, then frees it: the timeline's release point."""
        if saved.ptr is not None:
            self._observe_unpacked(saved.ptr)
        for peer, ptr in saved.peers:
            if ptr is not None:
                peer._observe_unpacked(ptr)
        if saved.unpack is not None:
            return saved.unpack(saved.value)
        value = saved.value
        if value._version != saved.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{value.type()} {list(value.shape)}] is at version {value._version}; expected "
                f"version {saved.version} instead (checked by profiler's saved-tensor hook, as autograd "
                "checks when no hook is installed)"
            )
        return value

    @_guarded
    def _observe_saved(self, t: torch.Tensor, packed: Any = NOT_PACKED) -> int | None:
        """Count a saved tensor; the storage pointer counted for it in this forward, if any.

        (Unpacking it releases it on the timeline; its holder tells
        ``saved_freed`` when autograd lets go of it.)

        ``packed`` is what the script's own pack hook made of ``t``: what backward
        then holds on the device is the tensors in it there (a copy, a
        compressed form), or nothing if it moved ``t`` elsewhere (``save_on_cpu``).
        """
        if not self._running or self.model is None:
            self._pop_saved_hooks()  # measuring ended where our pair could not be popped, or the model was dropped
            return None
        step = self._step
        # Only what the forward (and a loss computed after it) saves: tensors
        # saved while backward recomputes a checkpointed segment are transient.
        if step is None or self._step_state not in ("forward", "after_forward") or threading.get_ident() != self._thread:
            return None
        if self._step_state == "after_forward" and step._current.graph_freed:
            # No loss can be built on an output whose graph is gone: this is
            # another model's forward, or a loss of its own, under our pair.
            if self._open_step_unused():
                self._drop_unused_step()
            self._not_ours = True
            return None
        step.saved_tensors += 1
        key = storage_key(t)
        if key is None:
            return None
        if packed is not NOT_PACKED:
            if CHECKPOINT_HOLDER is not None and isinstance(packed, CHECKPOINT_HOLDER):
                step.checkpointing = True  # dropped now, recomputed in backward: nothing held
                return None
            inside = tensors_held(packed)
            held = [(x, k) for x in inside if x.device == t.device and (k := storage_key(x)) is not None]
            if inside and not held:  # every tensor it keeps is elsewhere (save_on_cpu from a GPU)
                if key[0] not in self._param_storages:
                    step._current.offloaded += key[1]
                return None
            if held and all(k[0] != key[0] for _, k in held):  # a copy or a compressed form stays on the device
                for x, k in held:
                    self._count_saved(step, x, *k)
                ptr = held[0][1][0]
                return ptr if ptr in step._current.saved or ptr in step._current.copies else None
        self._count_saved(step, t, *key)
        f = step._current
        return key[0] if key[0] in f.saved or key[0] in f.copies else None

    def _count_saved(self, step: StepRecord, t: torch.Tensor, ptr: int, nbytes: int, path: str | None = None) -> None:
        """Charge a saved storage, once, to the autocast copies or to the running module's activations (or ``path``'s)."""
        f = step._current
        if ptr in self._param_storages or _is_parameter(t):
            return
        if ptr in f.freed:
            # Saved again after autograd let go of it: the same storage (a
            # detached output saved anew) or a new one at its address. Alive
            # again, counted afresh.
            del f.freed[ptr]
            f.saved.pop(ptr, None)
            f.copies.pop(ptr, None)
        elif ptr in f.saved or ptr in f.copies:
            return
        # A storage an earlier forward of this step saved and backward has not
        # freed (the same batch through the model twice) is alive once: its
        # timeline event is that forward's.
        alive = ptr in self._live
        now = time.perf_counter()
        if weight_copy_source(t):
            f.copies[ptr] = nbytes
            if not alive:
                f.events.append((now, "autocast_copies", nbytes))
                self._live[ptr] = ("autocast_copies", nbytes, f)
            return
        f.saved[ptr] = nbytes
        if not alive:
            f.events.append((now, "activations", nbytes))
            self._live[ptr] = ("activations", nbytes, f)
        if path is not None:
            bucket = "other"  # (what a custom Function's ctx holds: which module made it is not seen)
        elif self._stack and self._stack[-1] in self._compiled_mixed:
            path = self._paths.get(self._stack[-1], OUTSIDE)
            bucket = "other"  # inside a model compiled whole: which block saved it is not seen
            f.compiled.add(ptr)
        else:
            path = self._paths.get(self._stack[-1], OUTSIDE) if self._stack else OUTSIDE
            bucket = self._bucket_of(path, self._trunk_state)
        f.where[ptr] = (path, bucket)

    def saved_freed(self, forward: ForwardSaves, ptr: int) -> None:
        """Autograd let go of a saved tensor of ``forward`` (see ``SavedTensor.__del__``): the storage's last one frees it.

        Freed while no backward pass of the step has begun, it was never alive
        at one (another model's forward whose graph was dropped, or freed by its
        own backward): ``StepRecord.fold`` leaves it out of what that pass held.
        """
        left = forward.holders.get(ptr, 0) - 1
        if left > 0:
            forward.holders[ptr] = left
            return
        forward.holders.pop(ptr, None)
        step = self._step
        if step is not None and self._running and ptr not in forward.freed:
            # (during backward pass k: k, alive when it began; a backward call frees
            # the loss's saves before it reaches the model's output: its task says
            # which pass it turns out to be, see StepRecord.fold)
            forward.freed[ptr] = (step.backwards, torch._C._current_graph_task_id())

    @_guarded
    def _observe_unpacked(self, ptr: int) -> None:
        step = self._step
        if step is not None and ptr in self._live:
            category, nbytes, forward = self._live.pop(ptr)
            forward.events.append((time.perf_counter(), category, -nbytes))

    @_guarded
    def _grad_ready(self, param: torch.Tensor) -> None:
        """A parameter's gradient was accumulated: the timeline's gradient growth."""
        step = self._step
        if step is None or param.grad is None:
            return
        self._pass_accumulated = True
        ident, nbytes = memory_of(param.grad)
        if ident not in self._grads_seen:
            self._grads_seen[ident] = nbytes
            step.events.append((time.perf_counter(), "gradients", nbytes))

    # ---------------------------------------------------------- module hooks
    def _any_module_pre(self, module: nn.Module, args: Any) -> None:
        """Every module call in the process: this model's are passed on (one set lookup for the others).

        Inside the model only a step's calls matter (which module saves what):
        a forward that is not a training step (evaluation, a teacher) costs one
        call at its root.
        """
        if torch.compiler.is_compiling():
            return
        if id(module) not in self._hooked:
            if self._wraps_the_model(module):  # torch.compile(model): its call is the model's, compiled whole
                self._measure_as_compiled_whole()
                self._module_pre(self.model, args)
                step = self._step
                if step is not None and step._current.input_shape is None:
                    self._note_root_inputs(module, args)
            return
        if module is self.model:
            self._module_pre(module, args)
            step = self._step
            if step is not None and step._current.input_shape is None:  # batch and sequence sizes, once a forward
                self._note_root_inputs(module, args)
        elif self._step is not None and self.model is not None:  # (ids of a dropped model's modules are reused)
            self._module_pre(module, args)

    def _any_module_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if id(module) not in self._hooked:
            if self._wraps_the_model(module):
                self._module_post(self.model, args, output)
            return
        if module is self.model or self._step is not None:
            self._module_post(module, args, output)

    def _wraps_the_model(self, module: nn.Module) -> bool:
        """``module`` is a ``torch.compile`` wrapper of the model that ``profile(model)`` was given.

        The script trains through ``torch.compile(model)`` (made before or inside
        the block): the model's own hooks then run only inside the compiled
        code, where ours do nothing, but the wrapper's run in eager Python.
        What the compiled graphs save is measured as for a model compiled
        whole (``_measure_as_compiled_whole``). (Under the runner the wrapper is
        found as a model of its own.)
        """
        if type(module).__name__ != "OptimizedModule" or self._hooks_host is not None or self.model is None:
            return False
        return getattr(module, "_orig_mod", None) is self.model

    def _measure_as_compiled_whole(self) -> None:
        """The model runs compiled whole: no module hook inside says which block saves what; said in a note."""
        if self._bucket_of("", "before") != self._bucket_of("", "after"):
            self._compiled_mixed.add(id(self.model))
        if COMPILED_NOTE not in self.notes:
            self.notes.append(COMPILED_NOTE)

    @_guarded
    def _module_pre(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or PROCESS.forks != self._forks or threading.get_ident() != self._thread:
            return  # (dynamo tracing a model compiled after our hooks went on: no graph break from us)
        if module is self.model and not self._stack:
            self._root_forward_begin()
            # Autograd nodes numbered above the inputs' were made by this forward (see _count_function_ctx).
            self._seq_floor = max((t.grad_fn._sequence_nr() for t in tensors_in(args) if t.grad_fn is not None), default=-1)
        self._stack.append(id(module))
        if id(module) in self._block_modules:
            self._trunk_state = "in"
            step = self._step
            if step is not None and step.trunk_input_shape is None and self._step_state == "forward":
                # (batch, sequence, hidden) where the input is not token ids: a ViT's patches
                tensors = tensors_in(args)
                if tensors:
                    step.trunk_input_shape = tuple(int(d) for d in tensors[0].shape)
            if step is not None and not step.checkpointing and self._step_state == "forward":
                # A checkpointed block runs its forward without saving: reentrant
                # checkpointing under no_grad, the other kind under its own
                # saved-tensor hooks (which sit on top of ours).
                # (A frozen block run under no_grad has no input that requires grad.)
                top = torch._C._autograd._top_saved_tensors_default_hooks(False)
                reentrant = not torch.is_grad_enabled() and any(t.requires_grad for t in tensors_in(args))
                step.checkpointing = reentrant or (top is not None and top[0] is not self._pair[0])

    @_guarded
    def _module_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or PROCESS.forks != self._forks or threading.get_ident() != self._thread:
            return
        mid = id(module)
        if mid in self._stack:
            while self._stack and self._stack.pop() != mid:
                pass
        if mid in self._block_modules:
            self._trunk_state = "after"
        if module is self.model and not self._stack:
            self._root_forward_end(output)

    @_guarded
    def _root_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self._module_pre(module, args)
        self._note_inputs(args, kwargs)

    @_guarded
    def _note_root_inputs(self, module: nn.Module, args: Any) -> None:
        """``_note_inputs`` for a call seen by a global hook, which is not given the keyword arguments."""
        self._note_inputs(args, running_call_kwargs(module))

    def _note_inputs(self, args: Any, kwargs: Any) -> None:
        """Remember the forward's batch input shape: token ids if there are any, else the first tensor."""
        step = self._step
        if step is None or step._current.input_shape is not None:
            return
        tensors = tensors_in(args) + tensors_in(dict(kwargs or {}))
        if tensors:
            # Token ids are (batch, sequence) integers; 1-D class labels or a
            # segmentation mask passed beside the pixels are not.
            ids = [t for t in tensors if not t.is_floating_point() and not t.is_complex() and t.dim() == 2]
            step._current.input_shape = tuple(int(d) for d in (ids or tensors)[0].shape)
            step._current.input_is_tokens = bool(ids)

    def enter_current_forward(self, args: Any = (), kwargs: Any = None) -> None:
        """Start measuring a root forward that is already running.

        The runner creates the tracker from inside the model's first call, when
        that call's pre-hooks have already been gathered; this does what the
        root pre-hook would have done.
        """
        if self._running and not self._stack:
            self._root_forward_begin()
            self._stack.append(id(self.model))
            self._note_inputs(args, kwargs)

    def leave_current_forward(self, args: Any, output: Any) -> None:
        """End the root forward begun by ``enter_current_forward`` when no hook of ours will.

        A model compiled in place is found inside its compiled call, which our
        wrapper (installed then) is not around: the runner ends that call here.
        """
        if self._running and self._stack == [id(self.model)]:
            self._module_post(self.model, args, output)

    def _root_forward_begin(self) -> None:
        if self._step is not None and self._step_state == "backward" and torch._C._current_graph_task_id() != -1:
            # Backward recomputing a checkpointed model: part of that backward, not a
            # forward. (Reentrant checkpointing ran the first forward under no_grad,
            # unseen: its recomputation, with no step open, is the step's forward.)
            self._step.checkpointing = True
            return
        if self._stop_requested:
            self._done()
            return
        if self._in_optimizer_step and not self._optimizer_step_running():
            # Its step() raised and the script went on: that iteration is over.
            self._finish_step()
            self._in_optimizer_step, self._optimizer_frame = False, None  # also with no step open
        if self._step is None and self._running and self._enough_steps():
            self._done()  # the first forward after the last measured step, evaluation included
            return
        if not torch.is_grad_enabled() or not self._running or torch._C._get_tracing_state() is not None:
            return  # evaluation forwards (and torch.jit.trace's) are not training steps
        if not any(p.requires_grad for p in self.model.parameters()):
            return  # a frozen model (a teacher) run with gradients on: nothing of it trains
        # A forward inside optimizer.step() is a closure (LBFGS re-evaluating
        # the loss): part of this step, like a gradient-accumulation micro-batch.
        if (
            self._step is not None and self._step_state == "after_backward" and not self._in_optimizer_step
            # (a pass that accumulated no .grad was torch.autograd.grad, a gradient
            # penalty's: the step goes on, the next forward is one more of it)
            and self._pass_accumulated
        ):
            if self.optimizer is None and not self._looked_for_optimizer:
                # A step ended without an optimizer step: weights updated by hand,
                # or a GradScaler that skipped step() while its scale settles.
                # Only an optimizer that exists can tell the two apart.
                self._looked_for_optimizer = True
                self.optimizer = find_optimizer(self._param_ids)
            if self.optimizer is None:
                self._finish_step()  # hand-written update: the previous step is over
            elif self._gradients_cleared():
                # The optimizer is known but did not step, and zero_grad() has
                # run: that iteration is over. A GradScaler skips the step when
                # gradients overflow; without one, the weights were updated some
                # other way. (Otherwise this forward accumulates gradients.)
                if self._grad_scaler_alive is None:
                    self._grad_scaler_alive = grad_scaler_alive()
                self._step.optimizer_skipped = self._grad_scaler_alive
                self._finish_step()
        step = self._step
        if self._open_step_unused() or (
            step is not None and self._step_state == "after_forward" and not step.backwards
            and not self._in_optimizer_step and step.forwards >= FORWARDS_WITHOUT_BACKWARD_LIMIT
        ):
            # The forward before had no backward and its graph is gone: a shape
            # check, a summary or a loss printed with gradients on. Not part of a
            # training step (its batch is often another size): measured afresh.
            self._drop_unused_step()
        if self._step is None and not self._begin_step():
            return
        step = self._step
        if torch._C._current_graph_task_id() != -1:
            step.checkpointing = True  # a forward run by backward: a reentrant checkpoint's recomputation
        if step.forwards:
            self._release_cleared_gradients()  # (gradient accumulation: the next micro-batch begins)
        step.begin_forward()
        self._step_state = "forward"
        self._phase_begin("forward")
        self._push_saved_hooks()

    def _open_step_unused(self) -> bool:
        """The open step's forwards had no backward and their graphs are gone: no training step at all."""
        step = self._step
        return (
            step is not None and self._step_state == "after_forward" and not step.backwards
            and not self._in_optimizer_step and bool(step._forwards) and all(f.graph_freed for f in step._forwards)
        )

    def _drop_unused_step(self) -> None:
        """Leave out the open step, forwards whose graph was freed unused (``_open_step_unused``), with a note."""
        self.forwards_without_backward += self._step.forwards
        self._pop_saved_hooks()  # (another model's step, or a loss after the next forward, is not ours to see)
        self._step, self._step_state = None, "idle"

    def _root_forward_end(self, output: Any) -> None:
        step = self._step
        if step is None or self._step_state != "forward":
            return
        if self._saved_hooks_balanced:
            # The script's own pair is below ours: it pops the top one when its
            # `with` ends, so ours must be gone by then. What a loss computed
            # after this forward saves goes to the script's hooks unseen.
            self._pop_saved_hooks()
            if self._outer_hooks is not None:
                step.saves_after_forward_unseen = True
        self._step_state = "after_forward"
        fns = {id(t.grad_fn): t.grad_fn for t in tensors_in(output) if t.grad_fn is not None}
        forward = step._current
        forward.watched = bool(fns)
        forward.graph = [self._watch_backward(fn, forward) for fn in fns.values()]
        self._count_function_ctx(list(fns.values()))

    @_guarded
    def _count_function_ctx(self, roots: list) -> None:
        """Tensors a custom ``autograd.Function`` keeps as attributes of its ``ctx``.

        ``ctx.mask = mask`` holds a tensor for backward as ``save_for_backward``
        does, but passes no saved-tensor hook. The nodes this forward made (the
        graph from its outputs back to its inputs' nodes) are walked once, and
        what a custom Function's ctx holds on the model's device is counted as
        activations, charged to ``CTX_PATH``. Torch's own checkpoint Function
        keeps only RNG states there, not activations.
        """
        step, floor = self._step, self._seq_floor
        seen, stack = set(), list(roots)
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node._sequence_nr() <= floor:
                continue  # made before this forward (the inputs' graph: another model's, say)
            if isinstance(node, _FUNCTION_NODE) and getattr(node, "_forward_cls", None) is not _CHECKPOINT_FUNCTION:
                for t in tensors_in(list(vars(node).values())):
                    key = storage_key(t)
                    if key is not None and t.device == self.device:
                        self._count_saved(step, t, *key, path=CTX_PATH)
            stack.extend(n for n, _ in node.next_functions)

    def _watch_backward(self, fn: torch.autograd.graph.Node, forward: ForwardSaves) -> weakref.ref:
        """Tell ``_output_reached`` when backward reaches ``fn``, an output of ``forward``; a weak reference that dies with ``fn``.

        Autograd nodes take no weak references: the token kept by the hook
        closure on ``fn`` is what tells that the graph was freed.
        """
        token = _GraphToken()

        def prehook(grad_outputs: Any, token: _GraphToken = token) -> None:
            # (kept on the node, not removed once run: a graph retained for another
            # backward call, retain_graph=True, is a backward pass each time)
            self._output_reached(forward)

        handle = fn.register_prehook(prehook)
        ref = weakref.ref(token)
        self._node_hooks.append((ref, handle))
        if len(self._node_hooks) > 2 * self._node_hooks_pruned + 64:  # (a model that never trains runs all along)
            self._node_hooks = [(r, h) for r, h in self._node_hooks if r() is not None]
            self._node_hooks_pruned = len(self._node_hooks)
        return ref

    @_guarded
    def _output_reached(self, forward: ForwardSaves) -> None:
        """Backward reached one of ``forward``'s outputs: a backward pass begins, or it is one more it goes through.

        Each forward of a step is watched (``_watch_backward``) because which
        ones a backward goes through tells what was alive at once and what is
        no part of the step at all (see ``StepRecord.fold``). A backward that
        reaches a forward that an earlier backward of the step did not (one
        loss backpropagated per view) is a backward pass of its own.
        """
        step = self._step
        if step is None or not any(f is forward for f in step._forwards):
            return
        task = torch._C._current_graph_task_id()
        if self._step_state == "backward" and task == self._backward_task:
            if forward.reached_by is None:  # one more forward this backward goes through
                forward.reached_by = step.backwards
            return
        if self._step_state == "backward":  # (the last one's end was not seen: a backward that raised)
            self._backward_end()
        if self._step_state in ("after_forward", "forward", "after_backward"):
            # A new backward call: the first through this step's outputs, one per
            # view, or another loss on a graph an earlier call retained.
            self._backward_task = task
            self._backward_begin()
            step.pass_of_task[task] = step.backwards
            if forward.reached_by is None:
                forward.reached_by = step.backwards

    def _backward_begin(self) -> None:
        step = self._step
        self._step_state = "backward"
        self._pass_accumulated = False
        step.backwards += 1
        self._release_cleared_gradients()
        self._phase_begin("backward")
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    @_guarded
    def _backward_end(self) -> None:
        step = self._step
        if step is None or self._step_state != "backward":
            return
        self._count_gradients()
        # Saved tensors backward never used (a branch that needed no gradient)
        # are freed with the graph now; the timeline releases them here. A
        # forward whose output this backward did not reach keeps its own.
        now, alive = time.perf_counter(), {}
        for ptr, (category, nbytes, forward) in self._live.items():
            if forward.watched and forward.reached_by is None:
                alive[ptr] = (category, nbytes, forward)
            else:
                forward.events.append((now, category, -nbytes))
        self._live = alive
        self._step_state = "after_backward"

    # ------------------------------------------------------- optimizer hooks
    def _optimizer_step_running(self) -> bool:
        """Whether the ``step()`` whose pre-hook ran is still on the call stack.

        Its post-hook never runs when it raises; a script that catches the
        error (an out-of-memory retry) goes on to the next forward, which is
        then not a closure's.
        """
        target = self._optimizer_frame
        if target is None:
            return True  # not known: keep the old view
        frame = sys._getframe(1)
        while frame is not None:
            if id(frame) == target[0] and frame.f_code is target[1]:
                return True
            frame = frame.f_back
        return False

    def _gradients_cleared(self) -> bool:
        """True when ``zero_grad(set_to_none=True)`` ran: no trainable parameter has a gradient."""
        return all(p.grad is None for p in self._params() if p.requires_grad)

    @_guarded
    def _optimizer_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if PROCESS.forks != self._forks or self.model is None or not updates_any(opt, self._param_ids):
            return  # (a dropped model's parameter ids may belong to new tensors now)
        step = self._step
        if self.optimizer is None:
            self.optimizer = opt
            if step is not None:
                self._merge_unconfirmed_steps(step)
                step = self._step
        if opt is self.optimizer:
            self._in_optimizer_step = True  # until its post-hook: a forward now is a closure's
            self._optimizer_frame = frame_identity(_caller_outside_this_module())
        if step is None:
            return
        self._pop_saved_hooks()
        self._count_gradients()
        if step.optimizer_state_before == 0 and not step.optimizer_steps:
            step.optimizer_state_before = self._count_optimizer_state(opt)[0]
        self._phase_begin("optimizer")

    def _merge_unconfirmed_steps(self, step: StepRecord) -> None:
        """The optimizer shows up only now: earlier backward passes were micro-batches of this step.

        Until an optimizer steps, the end of a backward followed by a new
        forward looked like a hand-written update (one step each). Seeing the
        optimizer's first ``step()`` proves they were gradient accumulation.
        """
        earlier = [s for s in self.steps if s.optimizer_steps == 0]
        if not earlier or len(earlier) != len(self.steps):
            return
        for name in PHASES:  # the last backward is still open: close it on this step, then merge
            if step.phases[name]._start is not None:
                self._phase_end(name)
        step.fold()
        merged = earlier[0]
        for s in earlier[1:] + [step]:
            merged.forwards += s.forwards
            merged.backwards += s.backwards
            merged.saved_tensors += s.saved_tensors
            merged.gradients = max(merged.gradients, s.gradients)
            if s.activations >= merged.activations:
                merged.activations = s.activations
                merged.activations_by_module = s.activations_by_module
                merged.activations_by_bucket = s.activations_by_bucket
                merged.activations_inside_compiled = s.activations_inside_compiled
            merged.autocast_copies = max(merged.autocast_copies, s.autocast_copies)
            merged.activations_offloaded = max(merged.activations_offloaded, s.activations_offloaded)
            merged.events.extend(s.events)
            for name, spans in s.phase_spans.items():
                merged.phase_spans.setdefault(name, []).extend(spans)
            for name, ph in s.phases.items():
                mp = merged.phases[name]
                mp.seconds += ph.seconds
                mp._device_spans.extend(ph._device_spans)
                if ph.peak_allocated is not None:
                    mp.peak_allocated = max(mp.peak_allocated or 0, ph.peak_allocated)
                    mp.allocated_end, mp.reserved_end = ph.allocated_end, ph.reserved_end
            for attr in ("peak_allocated", "reserved"):
                if getattr(s, attr) is not None:
                    setattr(merged, attr, max(getattr(merged, attr) or 0, getattr(s, attr)))
        merged.phases["optimizer"] = step.phases["optimizer"]
        merged.complete = False
        self.steps = []
        self._step = merged

    def _optimizer_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_post_hooks = True
        try:
            self._after_optimizer_step(opt)
        finally:
            self._in_post_hooks = False

    @_guarded
    def _after_optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        if PROCESS.forks != self._forks or opt is not self.optimizer or self.model is None:
            return
        self._in_optimizer_step, self._optimizer_frame = False, None
        step = self._step
        if step is None:
            return
        self._phase_end("optimizer")
        step.optimizer_steps += 1
        total, by_name, by_group = self._count_optimizer_state(opt)
        step.optimizer_state, step.optimizer_state_by_name, step.optimizer_state_by_group = total, by_name, by_group
        if total != step.optimizer_state_before:
            step.events.append((time.perf_counter(), "optimizer_state", total - step.optimizer_state_before))
        self._finish_step()
        if self._enough_steps():
            # Done now, not at the next forward: a model trained exactly these
            # steps may never run again, and the runner lets it go once done.
            # (stop() retires our post-hook rather than deleting it: see there.)
            self._done()


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or a view of one: weights, not activations, whichever model or loss they belong to.

    A loss's own trained weights (proxies, a projector) or another model's
    (the other tower of a two-tower model) are saved for backward as often as
    this model's, whose storages are known beforehand.
    """
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def _tracker_of(hook: Callable) -> "StepTracker | None":
    """The tracker whose pack hook ``hook`` is (itself, or wrapped by ``torch._dynamo.disable``)."""
    owner = getattr(getattr(hook, "__wrapped__", hook), "__self__", None)
    return owner if isinstance(owner, StepTracker) else None


def _pop_tracker_pairs(thread: int, may_go: Callable[["StepTracker"], bool]) -> None:
    """Pop trackers' pairs off the top of this thread's saved-tensor hook stack while ``may_go(tracker)``.

    Stops at the first pair that is not a tracker's own (the script's), or
    whose tracker is of another thread or must stay.
    """
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(False)) is not None:
        other = _tracker_of(top[0])
        if other is None or other._thread != thread or top[0] is not other._pair[0] or not may_go(other):
            break
        torch._C._autograd._pop_saved_tensors_default_hooks()
        other._saved_hooks_pushed = False


def _parameters(model: nn.Module | None) -> list[nn.Parameter]:
    """The model's parameters that have a shape: a lazy module that never ran has none to count.

    None for a model the script dropped (``hold_model=False``): nothing left to count.
    """
    return [] if model is None else [p for p in model.parameters() if not is_lazy(p)]


def _caller_outside_this_module() -> Any:
    """The innermost frame on the stack that is not this module's (torch's step wrapper)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    return frame


