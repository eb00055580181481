"""Textbook memory formulas beside the measurement, each with its error and what it misses.

Why: rules of thumb disagree (8, 16, 18 or 20 bytes per parameter, depending
on who you ask) and profilers measure without projecting. Each formula here
carries its source, is computed from the inventory and the batch and
sequence sizes that were actually observed, and is printed next to what was
measured with its error and the terms it leaves out, so the reader learns
*why* it is off. (Planning a batch size from the measurement is ``fit``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..model.traits import ModelTraits, model_traits
from .report import ModelReport
from .schema import CategoriesJSON, StepJSON
from .steps import batch_and_sequence, described_step

__all__ = ["ModelShape", "estimates_section", "model_shape", "model_states"]


@dataclass(frozen=True)
class ModelShape:
    """What the activation formulas need to know about a transformer."""

    layers: int | None
    hidden: int | None
    heads: int | None
    vocab: int | None
    batch: int | None
    seq: int | None
    reasons: tuple[str, ...] = ()
    seq_source: str | None = None  # said when the sequence length is not the token ids' length

    @property
    def transformer(self) -> bool:
        return None not in (self.layers, self.hidden, self.heads, self.batch, self.seq)


def model_shape(
    model_report: ModelReport, traits: ModelTraits | None = None, step: StepJSON | None = None
) -> ModelShape:
    """Layers, hidden size, heads, vocab from the structure; batch and sequence from the step."""
    traits = traits or ModelTraits()
    reasons = []
    trunks = model_report.buckets.trunks
    layers = sum(t.blocks for t in trunks) if trunks else None
    if layers is None:
        reasons.append("no repeated trunk of blocks was found")
    # The token embedding is the largest 2-D parameter charged to the embedding bucket.
    emb = [
        p
        for p in model_report.inventory.parameters
        if model_report.buckets.param_bucket.get(p.name) == "embedding" and len(p.shape) == 2
    ]
    token_table = max(emb, key=lambda p: p.numel) if emb else None
    hidden = traits.hidden or (token_table.shape[1] if token_table else None)
    vocab = traits.vocab or (token_table.shape[0] if token_table else None)
    heads = traits.heads
    if hidden is None:
        reasons.append("hidden size unknown (no config and no embedding table)")
    if heads is None:
        reasons.append("number of attention heads unknown (no config attribute or module attribute)")
    batch = seq = None
    source = None
    if step is not None and step.get("input_shape"):
        batch, token_seq = batch_and_sequence(step)
        trunk = step.get("trunk_input_shape") or []
        if token_seq is not None:
            seq = token_seq
        elif (
            len(trunk) == 3
            and trunk[0] == batch
            and (traits.hidden or trunk[2]) == trunk[2]
            and _block_has_width(model_report, trunk[2])
        ):
            # Not token ids (a ViT's pixels): the blocks' input is (batch, sequence,
            # hidden), hidden being a width of the block's own weights (a norm's,
            # a projection's), not a Conv1d's (batch, channels, length).
            seq, hidden = trunk[1], trunk[2]
            source = "from the first block's input"
            reasons = [r for r in reasons if not r.startswith("hidden size unknown")]
        else:
            reasons.append(
                "the model's input is not a batch of token ids, and its blocks' input is not "
                "(batch, sequence, hidden), so there is no sequence length"
            )
    else:
        reasons.append("no measured step with a batch input")
    return ModelShape(layers, hidden, heads, vocab, batch, seq, tuple(reasons), source)


def _block_has_width(model_report: ModelReport, width: int) -> bool:
    """Whether the first trunk block has a norm of ``width`` or a matrix taking ``width`` inputs."""
    trunks = model_report.buckets.trunks
    if not trunks or not trunks[0].block_paths:
        return False
    prefix = trunks[0].block_paths[0] + "."
    shapes = [tuple(p.shape) for p in model_report.inventory.parameters if p.name.startswith(prefix)]
    return any(s == (width,) for s in shapes) or any(len(s) == 2 and s[1] == width for s in shapes)


# ------------------------------------------------------------------------ formulas
def _row(term: str, estimate: int | None, measured: int | None) -> dict[str, Any]:
    error = None
    if estimate is not None and measured:
        error = (estimate - measured) / measured
    return {"term": term, "estimate": estimate, "measured": measured, "error": error}


def _formula(
    name: str,
    source: str,
    rows: list[dict[str, Any]],
    misses: list[str],
    applicable: bool = True,
    reason: str | None = None,
) -> dict[str, Any]:
    est = sum(r["estimate"] or 0 for r in rows) if applicable else None
    known = [r["measured"] for r in rows if r["measured"] is not None]
    meas = sum(known) if known else None
    return {
        "name": name,
        "source": source,
        "applicable": applicable,
        "reason": reason,
        "terms": rows,
        "estimate": est,
        "measured": meas,
        "error": (est - meas) / meas if est is not None and meas else None,
        "misses": misses,
    }


def model_states(cat: CategoriesJSON) -> int:
    """What does not grow with the batch: weights, their copies, gradients, optimizer state."""
    return cat["parameters"] + cat["gradients"] + cat["optimizer_state"] + cat["autocast_copies"]


def _mixed_precision(step: StepJSON) -> bool:
    return step["categories"]["autocast_copies"] > 0


def estimates_section(model_report: ModelReport, model: nn.Module | ModelTraits | None = None) -> dict[str, Any]:
    """Every formula, computed for this model (or its traits) and its described step, beside the measurement."""
    traits = model if isinstance(model, ModelTraits) else model_traits(model)
    memory = model_report.memory or {}
    step = described_step(memory.get("steps", []))
    if step is None or not step.get("complete"):
        return {"available": False, "reason": "no complete training step was measured", "formulas": []}
    shape = model_shape(model_report, traits, step)
    n = model_report.inventory.total
    common = _common_misses(step["categories"], memory.get("optimizer"), n)
    formulas = [
        _tutorial(step, shape, n, common),
        *_model_state_rules(step, n, common),
        *_activation_formulas(step, shape, traits),
    ]
    return {
        "available": True,
        "step": step["index"],
        "shape": {
            "layers": shape.layers,
            "hidden": shape.hidden,
            "heads": shape.heads,
            "vocab": shape.vocab,
            "batch": shape.batch,
            "seq": shape.seq,
            "seq_source": shape.seq_source,
            "batch_source": step.get("batch_source"),
        },
        "mixed_precision": _mixed_precision(step),
        "formulas": formulas,
    }


def _common_misses(cat: CategoriesJSON, opt_name: str | None, n: int) -> list[str]:
    """What every parameter-based formula misses for this step: frozen parameters, an optimizer not Adam."""
    # Measured, not from the inventory: a script may freeze parameters after the model was found.
    misses = (
        [
            f"frozen parameters: only {cat['gradients'] / cat['parameters']:.0%} of the weight bytes have a gradient "
            "(and optimizer state); the formula counts every parameter"
        ]
        if 0 < cat["gradients"] < 0.99 * cat["parameters"]
        else []
    )
    # Adam's two moments are in every formula: say so when the script used something else.
    if opt_name is None:
        misses.append("no optimizer stepped: no optimizer state was measured (Adam's would be 8 bytes/param)")
    elif "adam" not in opt_name.lower():
        per_param = f"{cat['optimizer_state'] / n:.1f}" if n else "n/a"
        misses.append(f"the script's optimizer is {opt_name}, not Adam: its state is {per_param} bytes/param, Adam's 8")
    return misses


def _tutorial(step: StepJSON, shape: ModelShape, n: int, common: list[str]) -> dict[str, Any]:
    """The tutorial's formula: fp16 weights x1 + gradients x1 + AdamW x2 + b*s*h*4."""
    cat = step["categories"]
    bsh4 = 4 * shape.batch * shape.seq * shape.hidden if None not in (shape.batch, shape.seq, shape.hidden) else None
    misses = []
    if cat["parameters"] > 2 * n:
        misses.append("master weights are kept in fp32 (4 bytes/param), not fp16")
    if cat["gradients"] > 2 * n:
        misses.append("gradients are fp32 (4 bytes/param)")
    if cat["optimizer_state"] > 4 * n:
        misses.append("AdamW's two moments are fp32: 8 bytes/param, not 4")
    if cat["autocast_copies"]:
        misses.append("autocast's 16-bit (fp16/bf16) weight copies")
    if bsh4 is not None and cat["activations"] > bsh4:
        misses.append(
            f"activations: autograd saves {cat['activations'] / bsh4:.0f}x batch*seq*n_embd*4 "
            "(attention, MLP, norms, logits and the loss all save tensors)"
        )
    misses += common
    misses.append("temporaries, allocator slack and the CUDA context")
    return _formula(
        "tutorial",
        "the tutorial's formula: fp16 weights x1 + gradients x1 + AdamW x2 + batch*seq*n_embd*4",
        [
            _row("weights", 2 * n, cat["parameters"] + cat["autocast_copies"]),
            _row("gradients", 2 * n, cat["gradients"]),
            _row("optimizer state", 4 * n, cat["optimizer_state"]),
            _row("activations", bsh4, cat["activations"]),
        ],
        misses,
        applicable=bsh4 is not None,
        reason=None if bsh4 is not None else "; ".join(shape.reasons),
    )


def _model_state_rules(step: StepJSON, n: int, common: list[str]) -> list[dict[str, Any]]:
    """16 bytes per parameter of model states: ZeRO's mixed-precision Adam, and plain fp32 Adam."""
    states_measured = model_states(step["categories"])
    amp = _mixed_precision(step)
    if amp:
        zero_misses = [
            "PyTorch autocast keeps fp32 gradients (4 bytes/param, ZeRO counts fp16: 2) "
            "and makes 16-bit weight copies on top"
        ]
    else:
        zero_misses = ["this step ran without autocast: no fp16 copies exist, see the fp32 Adam rule"]
    return [
        _formula(
            "zero-mixed-adam",
            "Rajbhandari et al. 2020 (ZeRO), mixed-precision Adam: 16 bytes/param "
            "(2 fp16 weights + 2 fp16 grads + 12 fp32 master/momentum/variance)",
            [_row("model states", 16 * n, states_measured)],
            zero_misses + common + ["activations are not model states: not in the 16"],
        ),
        _formula(
            "fp32-adam",
            "plain fp32 Adam: 4 weights + 4 gradients + 8 moments = 16 bytes/param",
            [_row("model states", 16 * n, states_measured)],
            (["autocast's 16-bit weight copies (2 bytes/param of the matmul weights)"] if amp else [])
            + common
            + ["activations are not model states"],
        ),
    ]


def _activation_formulas(step: StepJSON, shape: ModelShape, traits: ModelTraits) -> list[dict[str, Any]]:
    """Korthikanti et al. 2022: activations per transformer layer, compared with the block bucket."""
    if not shape.transformer:
        return [
            _formula(
                "korthikanti",
                "Korthikanti et al. 2022, per-layer transformer activations",
                [_row("block activations", None, None)],
                [],
                applicable=False,
                reason="; ".join(shape.reasons),
            )
        ]
    block_measured = step["activations_by_bucket"].get("block", 0)
    compiled_whole = []
    if step.get("activations_inside_compiled"):
        # Measured, but inside one compiled graph: which part the blocks saved is not known.
        block_measured = None
        compiled_whole = [
            "the model is compiled whole: its activations are measured in total, not per block "
            "(compile the blocks one by one to have them compared)"
        ]
    s, b, h, a, layers = shape.seq, shape.batch, shape.hidden, shape.heads, shape.layers
    act_bytes = 2 if _mixed_precision(step) else 4
    scale = act_bytes / 2  # the paper counts 16-bit activations
    linear = int(layers * 34 * s * b * h * scale)
    quadratic = int(layers * 5 * a * s * s * b * scale)
    checkpointed = (
        [
            "gradient checkpointing: what is checkpointed keeps only its inputs and recomputes the rest in backward; "
            "the formula counts every activation a full forward keeps"
        ]
        if step.get("gradient_checkpointing")
        else []
    )
    return [
        _formula(
            name,
            f"Korthikanti et al. 2022, {note}; x{scale:g} for {act_bytes}-byte activations; "
            "compared with the block bucket",
            [_row("block activations", est, block_measured)],
            compiled_whole
            + ["embedding, final norm, logits and loss activations (outside the layers)"]
            + _dropout_misses(traits)
            + checkpointed,
        )
        for name, est, note in (
            ("korthikanti-full", linear + quadratic, "34*s*b*h + 5*a*s^2*b per layer (attention scores materialised)"),
            ("korthikanti-flash", linear, "34*s*b*h per layer (fused / flash attention: no s^2 term)"),
        )
    ]


def _dropout_misses(traits: ModelTraits) -> list[str]:
    """What the formula's dropout masks (1 byte per element, in the 34) mean for this model."""
    if traits.active_dropout is None:
        return ["includes dropout masks (1 byte per element) that a model without dropout never saves"]
    if traits.active_dropout:
        return []  # the model has dropout: its masks are saved, as the formula assumes
    return ["includes dropout masks (1 byte per element) that this model, with no active dropout, never saves"]
