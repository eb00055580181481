"""Run under torchrun: each data-parallel mode measured by ``profile()`` and counted independently, rank by rank.

One launch runs every mode (DDP, DDP + gradient_as_bucket_view, ZeRO-1, FSDP1,
FSDP2) on a tiny tied GPT, so the 2-process test costs one start-up. The
independent count uses none of the profiler's code: a walk of the local
shards (``DTensor.to_local()``, FSDP1's flat parameters), of the optimizer's
state (``opt.optim.state`` for ZeRO), and a saved-tensor hook of its own
that keys storages by identity and sorts a saved parameter into "this rank's
shard" or "gathered by FSDP" at pack time. Writes ``OUT/rank{N}.json``.

    torchrun --standalone --nproc_per_node 2 tests/scripts/ranks_truth.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from nanogpt import GPT, Block, GPTConfig  # noqa: E402

from profiler import profile  # noqa: E402

CONFIG = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=True)
MODES = ("ddp", "ddp_view", "zero1", "fsdp", "fsdp2")


def build(mode: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    if mode in ("ddp", "ddp_view", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, gradient_as_bucket_view=mode == "ddp_view")
    elif mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu")
        )
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    if mode == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    return model, opt


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (this rank's memory)."""
    seen = {}
    for t in tensors:
        s = local(t).untyped_storage()
        seen[s.data_ptr() or id(t)] = s.nbytes()
    return sum(seen.values())


def params(model: nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in model.parameters()}.values())


class SavedCount:
    """A saved-tensor hook pair of the test's own: storages keyed by identity, parameters sorted at pack time."""

    def __init__(self, shards: set[int]) -> None:
        self.shards = shards  # ids of this rank's parameter storages (shards) before the step
        self.activations: dict[int, int] = {}
        self.gathered: dict[int, tuple[object, int]] = {}
        self.keep: list[object] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        base = t if t._base is None else t._base
        if isinstance(base, nn.Parameter):
            if id(s) not in self.shards:
                self.gathered.setdefault(id(s), (s, s.nbytes()))
        elif id(s) not in self.activations:
            self.activations[id(s)] = s.nbytes()
            self.keep.append(s)  # (held until the step ends: an identity is never reused while counted)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def run(mode: str, rank: int, out: Path) -> dict:
    model, opt = build(mode)
    gen = torch.Generator().manual_seed(100 + rank)
    truth: dict = {}
    with profile(model, opt, sample_interval=None) as prof:
        for _ in range(3):
            shards = {id(local(p).untyped_storage()) for p in params(model)}
            counter = SavedCount(shards)
            truth["parameters"] = storage_bytes(params(model))
            data = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=gen)
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                _, loss = model(data[:, :-1], data[:, 1:])
            truth["unsharded_held"] = sum(s.nbytes() for s, _ in counter.gathered.values())
            loss.backward()
            truth["gradients"] = storage_bytes([p.grad for p in params(model) if p.grad is not None])
            opt.step()
            inner = getattr(opt, "optim", opt)
            truth["optimizer_state"] = storage_bytes([v for st in inner.state.values() for v in st.values()])
            truth["activations"] = sum(counter.activations.values())
            truth["unsharded_saved"] = sum(n for _, n in counter.gathered.values())
            opt.zero_grad(set_to_none=True)
    truth["grad_elements_bytes"] = sum(
        p.numel() * p.element_size() for p in params(model) if p.requires_grad and not hasattr(p, "to_local")
    )
    truth["global_parameters"] = sum(
        (p._unpadded_unsharded_size.numel() if getattr(p, "_is_flat_param", False) else p.numel()) * p.element_size()
        for p in params(model)
    )
    prof.to_json(out / f"{mode}.json")  # every rank: its own file beside the path; rank 0: the merged one too
    section = prof.report.models[0].extra.get("parallel")
    step = prof.report.models[0].memory["steps"][-1]
    return {
        "truth": truth,
        "section": section,
        "step": {k: step[k] for k in ("unsharded_parameters_saved", "unsharded_parameters_held")}
        | dict(step["categories"]),
        "ranks": prof.report.ranks,
        "rendered": prof.render() if rank == 0 else None,
    }


def main() -> int:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {mode: run(mode, rank, out) for mode in MODES}
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
