"""The JSON report's version and the typed shape of its measured step.

The JSON form is a public contract: ``SCHEMA`` names its version; keys may be
added freely, but renaming or dropping one needs a new version. Bytes are
always integers; a figure that could not be measured is ``null`` with the
reason in a ``notes`` list, never a guess.

``StepJSON`` is the shape of one measured step: ``memory_section`` produces
it, and the text tables, the estimates, the fit planner and the plot read it.
A key added here is added for all of them (``docs/report-schema.md`` lists
them, and a test checks the list against this shape).
"""

from typing import Any, NotRequired, TypedDict

__all__ = [
    "SCHEMA",
    "BaselineJSON",
    "CategoriesJSON",
    "MemoryJSON",
    "OptimizerStateJSON",
    "PhaseJSON",
    "StepJSON",
    "TimelineJSON",
]

SCHEMA = "profiler.report/1"


class CategoriesJSON(TypedDict):
    """Bytes per category at the step's end (activations and copies: what backward held at its start)."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    autocast_copies: int
    other: int | None  # the allocator's peak minus categories_live_peak; null off CUDA


class OptimizerStateJSON(TypedDict):
    by_name: dict[str, int]
    by_group: list[int]


class PhaseJSON(TypedDict):
    seconds: float  # host time
    gpu_seconds: float | None  # CUDA events at the boundaries
    peak_allocated: int | None
    allocated_end: int | None
    reserved_end: int | None
    live_tensor_peak: int | None
    host_rss_peak: NotRequired[int | None]  # with a sampler
    nvml_process_used_peak: NotRequired[int | None]
    nvml_device_used_peak: NotRequired[int | None]


class BaselineJSON(TypedDict):
    """What the categories held when the step began."""

    parameters: int
    gradients: int
    optimizer_state: int


class TimelineJSON(TypedDict):
    """The step's events: seconds since it began, the category, the bytes added (+) or freed (-)."""

    t: list[float]
    category: list[str]
    delta: list[int]


class StepJSON(TypedDict):
    """One measured training step (``memory.steps[i]``)."""

    index: int
    kind: str  # "first" (the optimizer created its state; without state, the first, begun with no gradient) or "steady"
    complete: bool  # a forward and a backward that finished
    seconds: float
    input_shape: list[int] | None
    input_is_tokens: bool
    batch_dim: int | None  # which dimension of input_shape is the batch
    batch_source: str | None  # how that is known
    trunk_input_shape: list[int] | None
    forwards: int
    forwards_left_out: int
    activations_left_out: int
    backwards: int
    optimizer_steps: int
    optimizer_skipped: bool
    optimizer_failed: bool
    gradient_checkpointing: bool
    saves_after_forward_unseen: bool
    categories: CategoriesJSON
    optimizer_state: OptimizerStateJSON
    saved_tensors: int
    forwards_repeated: int  # forwards taken as repeats of one measured in full (their saves not read again)
    repeats_unverified: int  # of those, whose autograd graph differed from the measured one's
    repeats_raised: int  # forwards begun as repeats that raised: not counted (what they saved is not known)
    activations_measured: bool  # always true in this version
    activations_inside_compiled: int
    activations_offloaded: int
    unsharded_parameters_saved: int  # FSDP: the gathered full parameters saved for backward (not activations)
    unsharded_parameters_held: int  # of those, still gathered when the forward returned
    activations_by_bucket: dict[str, int]
    phases: dict[str, PhaseJSON]
    categories_live_peak: int
    allocated_start: int | None
    peak_allocated: int | None
    live_tensor_peak: int | None
    reserved: int | None
    nvml_process_used_peak: int | None
    nvml_device_used_peak: int | None
    host_rss_peak: int | None
    baseline: BaselineJSON
    timeline: TimelineJSON
    phase_spans: dict[str, list[list[float]]]
    sampler_offset: NotRequired[float]  # with a sampler: the step's start on the sampler's clock
    nvml_device_used_above_baseline_peak: NotRequired[int]  # where NVML shows the device, not the process


class MemoryJSON(TypedDict):
    """A model's ``memory`` section."""

    device: str
    allocator: str
    live_peak: bool
    optimizer: str | None
    steps: list[StepJSON]
    activations_by_module: list[dict[str, Any]]
    activations_by_block_module: list[dict[str, Any]]
    activations_step: int | None
    backward_passes_discarded: int  # passes whose gradients were cleared without an optimizer step
    notes: list[str]
    sampler: NotRequired[dict[str, Any]]
    gpu_replay: NotRequired[dict[str, Any]]  # with a projection: the steps replayed through the allocator model
    device_name: NotRequired[str]  # measured on CUDA
    device_capability: NotRequired[list[int]]
