"""Shared fixtures: the nanoGPT example loaded from its file, tiny GPT builders,
and the hand count of a nanoGPT model that the inventory tests check against."""

from __future__ import annotations

import os

# Before anything imports transformers (test modules are imported after this file).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NANOGPT_PATH = ROOT / "examples" / "nanogpt.py"


def _load_nanogpt():
    # The example may still be being written by someone else: give it a moment.
    deadline = time.monotonic() + 5.0
    while not NANOGPT_PATH.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not NANOGPT_PATH.exists():
        pytest.fail(f"{NANOGPT_PATH} does not exist")
    spec = importlib.util.spec_from_file_location("nanogpt_example", NANOGPT_PATH)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


@pytest.fixture(scope="session")
def nanogpt():
    """The module object of examples/nanogpt.py (GPTConfig, GPT, ...)."""
    return _load_nanogpt()


TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, tie_weights=True)


@pytest.fixture
def make_gpt(nanogpt):
    """Build a GPT from the tiny config, with any field overridden: make_gpt(bias=False)."""

    def build(**overrides):
        config = nanogpt.GPTConfig(**{**TINY, **overrides})
        return nanogpt.GPT(config)

    return build


@pytest.fixture
def tiny_gpt(make_gpt):
    """A tiny tied GPT on the CPU: 2 layers, n_embd 32, 2 heads, vocab 64, block 16."""
    return make_gpt()


def gpt_hand_count(V: int, T: int, C: int, L: int, bias: bool = True, tied: bool = True) -> dict[str, int]:
    """nanoGPT's parameters counted by hand, module by module (unique tensors)."""
    ln = 2 * C if bias else C
    b = 1 if bias else 0
    block = {
        "ln_1": ln,
        "attn.c_attn": C * 3 * C + b * 3 * C,
        "attn.c_proj": C * C + b * C,
        "ln_2": ln,
        "mlp.c_fc": C * 4 * C + b * 4 * C,
        "mlp.c_proj": 4 * C * C + b * C,
    }
    per_block = sum(block.values())
    wte, wpe, ln_f = V * C, T * C, ln
    lm_head = 0 if tied else V * C
    total = wte + wpe + L * per_block + ln_f + lm_head
    return {
        "wte": wte,
        "wpe": wpe,
        "embedding": wte + wpe,
        "per_block": per_block,
        "block": L * per_block,
        "ln_f": ln_f,
        "lm_head": lm_head,
        "head": ln_f + lm_head,
        "total": total,
        "total_with_duplicates": total + (V * C if tied else 0),
        "block_parts": block,
    }


@pytest.fixture(scope="session")
def hand_count():
    """``hand_count(V, T, C, L, bias=, tied=)``: nanoGPT counted by formula."""
    return gpt_hand_count
