"""Which measured steps the report describes: one rule for the tables, estimates, fit and plot.

A run measures several steps, and not all of them are the step the user asks
about: an iteration whose optimizer step a GradScaler skipped, or whose
``step()`` raised, has no (whole) optimizer phase; nor has a backward with no
optimizer step after it where other steps have one (a GAN's discriminator
backpropagated through by the generator's loss as the measuring ends).
"""

from __future__ import annotations

from .schema import StepJSON

__all__ = ["batch_and_sequence", "described_step", "described_steps", "shown_steps"]


def described_steps(steps: list[StepJSON]) -> list[StepJSON]:
    """Complete steps that updated the weights; else the complete ones; else all."""
    complete = [s for s in steps if s.get("complete")]
    updated = [s for s in complete if not (s.get("optimizer_skipped") or s.get("optimizer_failed"))]
    return [s for s in updated if s.get("optimizer_steps")] or updated or complete or steps


def described_step(steps: list[StepJSON]) -> StepJSON | None:
    """The step the report describes in detail: the last described one (the steady state a run repeats)."""
    chosen = described_steps(steps)
    return chosen[-1] if chosen else None


def shown_steps(steps: list[StepJSON]) -> list[StepJSON]:
    """The first and the last described step, the two that differ (the first creates the optimizer state)."""
    chosen = described_steps(steps)
    return [chosen[0], chosen[-1]] if len(chosen) > 1 else chosen


def batch_and_sequence(step: StepJSON, batch_dim: int | None = None) -> tuple[int | None, int | None]:
    """The step's batch size and, for token ids, sequence length.

    The batch is the input's ``batch_dim`` (the step's own, as measured, unless
    given: ``--fit-batches`` may have found it); a 2-D batch of token ids has its
    sequence in the other dimension, so (sequence, batch) ids read right.
    """
    shape = step.get("input_shape")
    dim = (step.get("batch_dim") or 0) if batch_dim is None else batch_dim
    if not shape or dim >= len(shape):
        return None, None
    seq = None
    if step.get("input_is_tokens") and len(shape) >= 2:
        seq = shape[1 if dim == 0 else 0]
    return shape[dim], seq
