"""A full fine-tuning step of a 7B/8B model from its transformers config: plan it without the memory.

The models are built from their published configurations (written out here,
so nothing is downloaded) with random weights, and trained for a few steps
on random tokens with AdamW. A 7B model's full fine-tuning step holds about
62 GiB in bf16, far more than this machine has, so run it on fake tensors, where every tensor has its shape and
dtype and no memory::

    python -m profiler --fake --fit H100 examples/plan_llama.py --model llama-2-7b --batch-size 1 --seq-len 2048
    python -m profiler --fake examples/plan_llama.py --model llama-2-7b --checkpointing --batch-size 4

``--layers N`` keeps only the first N layers, small enough to run for real
(and to check a plan against a real run of the same script).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

# Published configurations (config.json of each model on the Hugging Face hub).
MODELS = {
    "llama-2-7b": dict(
        arch="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "mistral-7b": dict(
        arch="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None,
    ),
    "llama-3-8b": dict(
        arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_model(name: str, layers: int | None, dtype: torch.dtype) -> torch.nn.Module:
    """The model with random weights, built directly in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    if layers is not None:
        spec["num_hidden_layers"] = layers
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (MistralConfig, MistralForCausalLM)
    config = config_cls(**spec, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype (a .to(dtype) would first make fp32 weights)
    try:
        return model_cls(config)
    finally:
        torch.set_default_dtype(previous)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="llama-2-7b")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights, gradients and AdamW state")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every decoder layer")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or (args.layers is not None and args.layers < 1):
        p.error("--batch-size, --seq-len and --layers must be at least 1")

    torch.manual_seed(0)
    model = build_model(args.model, args.layers, DTYPES[args.dtype])
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n:,} parameters, {args.dtype}, batch {args.batch_size} x {args.seq_len}")
    vocab = model.config.vocab_size
    for step in range(args.steps):
        tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len))
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
