"""The nanoGPT of ``nanogpt.py`` trained data-parallel under ``torchrun``: DDP, ZeRO-1, FSDP or FSDP2.

Each rank builds the same model (same seed), wraps it the way ``--mode`` says
and trains a few steps on its own random tokens. It runs on CPUs with the
gloo backend and on GPUs with NCCL (one GPU a rank, picked by ``LOCAL_RANK``)::

    torchrun --standalone --nproc_per_node 2 examples/nanogpt_distributed.py --mode fsdp2
    torchrun --standalone --nproc_per_node 2 examples/nanogpt_distributed.py --mode ddp \\
        --n_layer 2 --n_embd 64 --n_head 2 --vocab_size 100 --block_size 32 --seq-len 16

Modes:

* ``ddp``: ``DistributedDataParallel``; every rank holds every weight,
  gradient and optimizer state, plus the reducer's gradient buckets.
* ``zero1``: DDP with ``ZeroRedundancyOptimizer``; the AdamW state is split
  across ranks by whole parameters.
* ``fsdp``: ``FullyShardedDataParallel`` (FSDP1), one flat parameter a block.
* ``fsdp2``: ``fully_shard`` (FSDP2), parameters as DTensors sharded on dim 0.

Run under the profiler, each rank is measured and rank 0 prints one table::

    torchrun --standalone --nproc_per_node 2 -m profiler --json run.json \\
        examples/nanogpt_distributed.py --mode fsdp2
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt import GPT, Block, GPTConfig  # noqa: E402 - the model lives beside this script

MODES = ("ddp", "zero1", "fsdp", "fsdp2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", choices=MODES, default="fsdp2")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--untied", action="store_true", help="separate input embedding and output projection")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    return p


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The model as ``mode`` trains it."""
    if mode in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # device_id names the device even on CPU, where FSDP finds no accelerator to default to
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=device)
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the root: embeddings, final norm and the tied head
    return model


def make_optimizer(model: nn.Module, mode: str, lr: float) -> torch.optim.Optimizer:
    if mode == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ:
        print("nanogpt_distributed: run me under torchrun (see --help)", file=sys.stderr)
        return 2
    if args.seq_len > args.block_size:
        print(
            f"nanogpt_distributed: --seq-len ({args.seq_len}) must be <= --block_size ({args.block_size})",
            file=sys.stderr,
        )
        return 2
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # every rank starts from the same weights
    config = GPTConfig(
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        tie_weights=not args.untied,
    )
    model = wrap(GPT(config).to(device), args.mode, device)
    opt = make_optimizer(model, args.mode, args.lr)

    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        data = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), device=device, generator=gen)
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
