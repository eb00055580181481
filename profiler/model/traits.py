"""What the formulas read from the model object itself, not from its parameters.

Taken once, when a model is found, so a report can still be written after
the script dropped the model (the runner holds models weakly).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ModelTraits", "model_traits"]

_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads")
_VOCAB_KEYS = ("vocab_size", "n_vocab")


@dataclass(frozen=True)
class ModelTraits:
    """Config values and module facts of a model."""

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
