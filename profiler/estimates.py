"""Textbook memory formulas beside the measurement, and "will it fit" planning.

Why both: rules of thumb disagree (8, 16, 18 or 20 bytes per parameter,
depending on who you ask) and profilers measure without projecting. Each
formula here carries its source, is computed from the inventory and the
batch and sequence sizes that were actually observed, and is printed next to
what was measured with its error and the terms it leaves out, so the reader
learns *why* it is off.

Fit planning models the peak as a fixed part (weights, gradients, optimizer
state, weight copies, CUDA context) plus a part that grows with the batch,
taken from two or more measured batch sizes when there are, else by scaling
the measured per-sample bytes (and saying so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ProfilerError
from .report import ModelReport, updating_steps

__all__ = [
    "CARDS",
    "ModelShape",
    "ModelTraits",
    "model_shape",
    "model_traits",
    "estimates_section",
    "plan_fit",
    "parse_cards",
    "parse_batches",
    "FitPoint",
    "fit_points",
    "predict_required",
    "resolve_card",
    "check_margin",
]

GIB = 1024**3

# Nominal memory of common cards, GiB, from their spec sheets. Usable memory is
# a few percent lower (ECC, driver reservations): that is what the margin covers.
CARDS: dict[str, float] = {
    "T4": 16,
    "L4": 24,
    "A10G": 24,
    "V100-16GB": 16,
    "V100-32GB": 32,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H200": 141,
}

_CARD_ALIASES = {"V100": "V100-16GB", "A100": "A100-80GB", "H100": "H100-80GB"}


# --------------------------------------------------------------------------- shape
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


_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")
_VOCAB_KEYS = ("vocab_size", "n_vocab")


@dataclass(frozen=True)
class ModelTraits:
    """What the formulas read from the model object itself, not from its parameters.

    Taken once, so a report can still be written after the script dropped the
    model (the runner holds models weakly).
    """

    hidden: int | None = None  # from a config
    vocab: int | None = None  # from a config
    heads: int | None = None  # from a config, else an attention module's attribute
    active_dropout: bool | None = None  # None: the model was not seen


def model_traits(model: nn.Module | None) -> ModelTraits:
    """The config values and module facts of ``model`` that the formulas use."""
    if model is None:
        return ModelTraits()
    return ModelTraits(
        hidden=_config_value(model, _HIDDEN_KEYS),
        vocab=_config_value(model, _VOCAB_KEYS),
        heads=_config_value(model, _HEAD_KEYS) or _module_attribute(model, _HEAD_KEYS),
        active_dropout=any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()),
    )


def _config_value(model: nn.Module, keys: tuple[str, ...]) -> int | None:
    configs = [getattr(model, "config", None)]
    configs += [getattr(m, "config", None) for m in (getattr(model, "_orig_mod", None),) if m is not None]
    for cfg in configs:
        for key in keys:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _module_attribute(model: nn.Module, keys: tuple[str, ...]) -> int | None:
    """A head count stored on an attention module (nanoGPT's ``n_head``, MHA's ``num_heads``)."""
    for mod in model.modules():
        for key in keys:
            value = getattr(mod, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def model_shape(model_report: ModelReport, traits: ModelTraits | None = None, step: dict | None = None) -> ModelShape:
    """Layers, hidden size, heads, vocab from the structure; batch and sequence from the step."""
    traits = traits or ModelTraits()
    reasons = []
    trunks = model_report.buckets.trunks
    layers = sum(t.blocks for t in trunks) if trunks else None
    if layers is None:
        reasons.append("no repeated trunk of blocks was found")
    # The token embedding is the largest 2-D parameter charged to the embedding bucket.
    emb = [
        p for p in model_report.inventory.parameters
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
        shape = step["input_shape"]
        batch = shape[0]
        trunk = step.get("trunk_input_shape") or []
        if step.get("input_is_tokens") and len(shape) >= 2:
            seq = shape[1]
        elif (
            len(trunk) == 3 and trunk[0] == batch and (traits.hidden or trunk[2]) == trunk[2]
            and _block_has_width(model_report, trunk[2])
        ):
            # Not token ids (a ViT's pixels): the blocks' input is (batch, sequence,
            # hidden), hidden being a width of the block's own weights (a norm's,
            # a projection's), not a Conv1d's (batch, channels, length).
            seq, hidden = trunk[1], trunk[2]
            source = "from the first block's input"
            reasons = [r for r in reasons if not r.startswith("hidden size unknown")]
        else:
            reasons.append("the model's input is not a batch of token ids, and its blocks' input is not "
                           "(batch, sequence, hidden), so there is no sequence length")
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


def _formula(name: str, source: str, rows: list[dict[str, Any]], misses: list[str], applicable: bool = True, reason: str | None = None) -> dict[str, Any]:
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


def _model_states(cat: dict[str, Any]) -> int:
    """What does not grow with the batch: weights, their copies, gradients, optimizer state."""
    return cat["parameters"] + cat["gradients"] + cat["optimizer_state"] + cat["autocast_copies"]


def _mixed_precision(step: dict) -> bool:
    return step["categories"]["autocast_copies"] > 0


def estimates_section(model_report: ModelReport, model: nn.Module | ModelTraits | None = None) -> dict[str, Any]:
    """Every formula, computed for this model (or its traits) and its observed step, beside the measurement."""
    traits = model if isinstance(model, ModelTraits) else model_traits(model)
    memory = model_report.memory or {}
    steps = [s for s in updating_steps(memory.get("steps", [])) if s.get("complete")]
    if not steps:
        return {"available": False, "reason": "no complete training step was measured", "formulas": []}
    step = steps[-1]
    cat = step["categories"]
    n = model_report.inventory.total
    shape = model_shape(model_report, traits, step)
    amp = _mixed_precision(step)
    weights_measured = cat["parameters"] + cat["autocast_copies"]
    states_measured = _model_states(cat)
    formulas = []
    # Measured, not from the inventory: a script may freeze parameters after the model was found.
    frozen_miss = (
        [f"frozen parameters: only {cat['gradients'] / cat['parameters']:.0%} of the weight bytes have a gradient "
         "(and optimizer state); the formula counts every parameter"]
        if 0 < cat["gradients"] < 0.99 * cat["parameters"] else []
    )

    # Adam's two moments are in every formula below: say so when the script used something else.
    opt_name = memory.get("optimizer")
    if opt_name is None:
        optimizer_miss = ["no optimizer stepped: no optimizer state was measured (Adam's would be 8 bytes/param)"]
    elif "adam" not in opt_name.lower():
        per_param = f"{cat['optimizer_state'] / n:.1f}" if n else "n/a"
        optimizer_miss = [f"the script's optimizer is {opt_name}, not Adam: its state is {per_param} bytes/param, Adam's 8"]
    else:
        optimizer_miss = []

    # 1. The tutorial: fp16 weights x1 + gradients x1 + AdamW x2 + b*s*h*4.
    bsh4 = 4 * shape.batch * shape.seq * shape.hidden if None not in (shape.batch, shape.seq, shape.hidden) else None
    tutorial_misses = []
    if cat["parameters"] > 2 * n:
        tutorial_misses.append("master weights are kept in fp32 (4 bytes/param), not fp16")
    if cat["gradients"] > 2 * n:
        tutorial_misses.append("gradients are fp32 (4 bytes/param)")
    if cat["optimizer_state"] > 4 * n:
        tutorial_misses.append("AdamW's two moments are fp32: 8 bytes/param, not 4")
    if cat["autocast_copies"]:
        tutorial_misses.append("autocast's 16-bit (fp16/bf16) weight copies")
    if bsh4 is not None and cat["activations"] > bsh4:
        tutorial_misses.append(
            f"activations: autograd saves {cat['activations'] / bsh4:.0f}x batch*seq*n_embd*4 "
            "(attention, MLP, norms, logits and the loss all save tensors)"
        )
    tutorial_misses += frozen_miss + optimizer_miss
    tutorial_misses.append("temporaries, allocator slack and the CUDA context")
    formulas.append(
        _formula(
            "tutorial",
            "the tutorial's formula: fp16 weights x1 + gradients x1 + AdamW x2 + batch*seq*n_embd*4",
            [
                _row("weights", 2 * n, weights_measured),
                _row("gradients", 2 * n, cat["gradients"]),
                _row("optimizer state", 4 * n, cat["optimizer_state"]),
                _row("activations", bsh4, cat["activations"]),
            ],
            tutorial_misses,
            applicable=bsh4 is not None,
            reason=None if bsh4 is not None else "; ".join(shape.reasons),
        )
    )

    # 2. ZeRO: mixed-precision Adam keeps 16 bytes per parameter of model states.
    zero_misses = []
    if amp:
        zero_misses.append("PyTorch autocast keeps fp32 gradients (4 bytes/param, ZeRO counts fp16: 2) and makes 16-bit weight copies on top")
    else:
        zero_misses.append("this step ran without autocast: no fp16 copies exist, see the fp32 Adam rule")
    zero_misses += frozen_miss + optimizer_miss
    zero_misses.append("activations are not model states: not in the 16")
    formulas.append(
        _formula(
            "zero-mixed-adam",
            "Rajbhandari et al. 2020 (ZeRO), mixed-precision Adam: 16 bytes/param (2 fp16 weights + 2 fp16 grads + 12 fp32 master/momentum/variance)",
            [_row("model states", 16 * n, states_measured)],
            zero_misses,
        )
    )
    formulas.append(
        _formula(
            "fp32-adam",
            "plain fp32 Adam: 4 weights + 4 gradients + 8 moments = 16 bytes/param",
            [_row("model states", 16 * n, states_measured)],
            (["autocast's 16-bit weight copies (2 bytes/param of the matmul weights)"] if amp else [])
            + frozen_miss
            + optimizer_miss
            + ["activations are not model states"],
        )
    )

    # 3. Korthikanti et al. 2022: activations per transformer layer.
    block_measured = step["activations_by_bucket"].get("block", 0)
    compiled_whole = []
    if step.get("activations_inside_compiled"):
        # Measured, but inside one compiled graph: which part the blocks saved is not known.
        block_measured = None
        compiled_whole = ["the model is compiled whole: its activations are measured in total, not per block "
                          "(compile the blocks one by one to have them compared)"]
    if shape.transformer:
        s, b, h, a, layers = shape.seq, shape.batch, shape.hidden, shape.heads, shape.layers
        act_bytes = 2 if amp else 4
        scale = act_bytes / 2  # the paper counts 16-bit activations
        linear = int(layers * 34 * s * b * h * scale)
        quadratic = int(layers * 5 * a * s * s * b * scale)
        for name, est, note in (
            ("korthikanti-full", linear + quadratic, "34*s*b*h + 5*a*s^2*b per layer (attention scores materialised)"),
            ("korthikanti-flash", linear, "34*s*b*h per layer (fused / flash attention: no s^2 term)"),
        ):
            formulas.append(
                _formula(
                    name,
                    f"Korthikanti et al. 2022, {note}; x{scale:g} for {act_bytes}-byte activations; compared with the block bucket",
                    [_row("block activations", est, block_measured)],
                    compiled_whole
                    + ["embedding, final norm, logits and loss activations (outside the layers)"]
                    + _dropout_misses(traits)
                    + (["gradient checkpointing: what is checkpointed keeps only its inputs and recomputes the rest in backward; "
                        "the formula counts every activation a full forward keeps"] if step.get("gradient_checkpointing") else []),
                )
            )
    else:
        formulas.append(
            _formula(
                "korthikanti",
                "Korthikanti et al. 2022, per-layer transformer activations",
                [_row("block activations", None, None)],
                [],
                applicable=False,
                reason="; ".join(shape.reasons),
            )
        )
    return {
        "available": True,
        "step": step["index"],
        "shape": {
            "layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, "vocab": shape.vocab,
            "batch": shape.batch, "seq": shape.seq, "seq_source": shape.seq_source,
        },
        "mixed_precision": amp,
        "formulas": formulas,
    }


def _dropout_misses(traits: ModelTraits) -> list[str]:
    """What the formula's dropout masks (1 byte per element, in the 34) mean for this model."""
    if traits.active_dropout is None:
        return ["includes dropout masks (1 byte per element) that a model without dropout never saves"]
    if traits.active_dropout:
        return []  # the model has dropout: its masks are saved, as the formula assumes
    return ["includes dropout masks (1 byte per element) that this model, with no active dropout, never saves"]


# ---------------------------------------------------------------------- planning
@dataclass(frozen=True)
class FitPoint:
    """One measured step: its batch size and the memory it needed."""

    batch: int
    seq: int | None
    required: int  # bytes: allocator peak on CUDA, sum of measured categories on CPU
    fixed: int  # weights, gradients, optimizer state, weight copies
    context: int | None  # NVML process used - allocator reserved (CUDA context, workspaces)
    source: str


def fit_points(memory: dict[str, Any]) -> list[FitPoint]:
    """The measured steps as planning points, one per batch size (the largest need)."""
    best: dict[tuple[int, int | None], FitPoint] = {}
    for step in updating_steps(memory.get("steps", [])):
        if not step.get("complete") or not step.get("input_shape"):
            continue
        cat = step["categories"]
        fixed = _model_states(cat)
        if step.get("peak_allocated") is not None:
            required, source = step["peak_allocated"], "allocator peak"
        elif step.get("live_tensor_peak") is not None:
            required, source = step["live_tensor_peak"], "live-tensor peak (dispatch tracking, no allocator on CPU)"
        else:
            required, source = fixed + cat["activations"], "sum of measured categories (no allocator on CPU)"
        context = None
        if step.get("nvml_process_used_peak") is not None and step.get("reserved") is not None:
            context = max(0, step["nvml_process_used_peak"] - step["reserved"])
        shape = step["input_shape"]
        seq = shape[1] if step.get("input_is_tokens") and len(shape) >= 2 else None
        point = FitPoint(shape[0], seq, required, fixed, context, source)
        key = (point.batch, point.seq)
        if key not in best or best[key].required < point.required:
            best[key] = point
    return sorted(best.values(), key=lambda p: p.batch)


def _linear_fit(points: list[FitPoint]) -> tuple[float, float]:
    """Least squares of required bytes against batch size: (bytes per sample, fixed bytes)."""
    xs = [p.batch for p in points]
    ys = [p.required for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return slope, my - slope * mx


def plan_fit(
    memory: dict[str, Any],
    extra_points: list[FitPoint] | None = None,
    cards: dict[str, float] | None = None,
    margin: float = 0.10,
    focus: str | None = None,
) -> dict[str, Any]:
    """Predict the memory at any batch size and the largest batch each card holds."""
    check_margin(margin)
    cards = dict(CARDS if cards is None else cards)
    if focus is not None:
        key = resolve_card(focus, cards)
        cards = {key: cards[key]}
    own = fit_points(memory)
    points = own + list(extra_points or [])
    seqs = {p.seq for p in points}
    if not points:
        return {"available": False, "reason": "no complete step with a batch input was measured", "cards": []}
    if len(seqs) > 1:
        # Different sequence lengths do not share one line: keep the most common.
        common = max(seqs, key=lambda s: sum(p.seq == s for p in points))
        points = [p for p in points if p.seq == common]
    batches = sorted({p.batch for p in points})
    context = max((p.context for p in points if p.context is not None), default=None)
    if len(batches) >= 2:
        per_sample, fixed = _linear_fit(points)
        method = f"linear fit over measured batch sizes {batches}"
    else:
        p = points[0]
        per_sample = (p.required - p.fixed) / p.batch
        fixed = p.fixed
        method = (
            f"one measured batch size ({p.batch}): assumed everything but weights, gradients, optimizer state "
            "and weight copies grows in proportion to the batch"
        )
    notes = []
    if context is None:
        notes.append("CUDA context and library workspaces not measured (no NVML process figure): not included")
    if points[0].source.startswith("sum"):
        notes.append("measured on CPU: temporaries are not counted (--live-peak counts them), and the projection assumes the same dtype on the GPU")
    elif points[0].source.startswith("live"):
        notes.append("measured on CPU: the projection assumes the same dtype on the GPU")
    ctx = context or 0

    def required(batch: int) -> int:
        return int(round(fixed + per_sample * batch)) + ctx

    measured_batch = max(p.batch for p in own) if own else max(batches)  # the size the user ran
    rows = []
    for name, gib in cards.items():
        capacity = int(gib * GIB)
        usable = capacity * (1 - margin)
        if per_sample > 0:
            largest = math.floor((usable - fixed - ctx) / per_sample)
            largest = max(largest, 0)
        else:
            largest = None
        rows.append(
            {
                "card": name,
                "capacity": capacity,
                "usable": int(usable),
                "required_at_measured_batch": required(measured_batch),
                "fits_at_measured_batch": required(measured_batch) <= usable,
                "largest_batch": largest,
            }
        )
    return {
        "available": True,
        "method": method,
        "sequence_length": points[0].seq,
        "measured_batches": batches,
        "measured_batch": measured_batch,
        "source": points[0].source,
        "bytes_per_sample": per_sample,
        "fixed_bytes": int(fixed),
        "context_bytes": context,
        "margin": margin,
        "points": [
            {"batch": p.batch, "seq": p.seq, "required": p.required, "fixed": p.fixed, "context": p.context} for p in points
        ],
        "cards": rows,
        "notes": notes,
    }


def predict_required(fit: dict[str, Any], batch: int, include_context: bool = True) -> int:
    """Bytes the fitted model predicts at ``batch``.

    Without the context it is directly comparable with the quantity that was
    fitted (the allocator's peak on CUDA, the measured categories on CPU).
    """
    context = (fit["context_bytes"] or 0) if include_context else 0
    return int(round(fit["fixed_bytes"] + fit["bytes_per_sample"] * batch)) + context


# ------------------------------------------------------------------- parsing
def check_margin(margin: float) -> None:
    """A safety margin is a fraction of the card left unused: 0 up to (not including) 1."""
    if not 0 <= margin < 1:
        raise ProfilerError(f"--margin must be at least 0 and below 1, got {margin}")


def resolve_card(name: str, cards: dict[str, float]) -> str:
    """Case-insensitive card lookup, with a one-line error listing the known names."""
    lowered = {k.lower(): k for k in cards}
    key = _CARD_ALIASES.get(name.upper(), name)
    if key.lower() in lowered:
        return lowered[key.lower()]
    raise ProfilerError(f"unknown card {name!r}; known: {', '.join(cards)} (add one with --gpu NAME=GiB)")


def parse_cards(specs: list[str] | None) -> dict[str, float]:
    """The card table plus ``NAME=GiB`` entries from the command line."""
    cards = dict(CARDS)
    for spec in specs or []:
        name, sep, size = spec.partition("=")
        if not sep or not name.strip():
            raise ProfilerError(f"--gpu expects NAME=GiB (e.g. RTX4090=24), got {spec!r}")
        try:
            gib = float(size)
        except ValueError:
            raise ProfilerError(f"--gpu {spec}: {size!r} is not a number of GiB") from None
        if not gib > 0 or math.isinf(gib):
            raise ProfilerError(f"--gpu {spec}: memory must be a positive number of GiB")
        cards[name.strip()] = gib
    return cards


def parse_batches(text: str) -> list[int]:
    """``"4,8"`` -> ``[4, 8]``; anything but positive whole numbers is a one-line error."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) <= 0:
            raise ProfilerError(f"--fit-batches expects positive whole numbers separated by commas, got {text!r}")
        out.append(int(part))
    if len(set(out)) != len(out):
        raise ProfilerError(f"--fit-batches has a repeated batch size: {text!r}")
    return sorted(out)
