"""A 2-rank DDP job in which rank 1 misbehaves: ``hang`` (sleeps before ending), ``die`` (raises at the end),
or ``idle`` (trains nothing while rank 0 trains a model of its own).

torchrun --standalone --nproc_per_node 2 -m profiler --json OUT.json tests/scripts/ranks_fail.py hang
"""

import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")
rank = dist.get_rank()
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
if sys.argv[1] != "idle":
    model = DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for _ in range(3 if sys.argv[1] != "idle" or rank == 0 else 0):
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()
if sys.argv[1] == "idle":
    dist.barrier()
if sys.argv[1] == "hang" and rank == 1:
    time.sleep(8)  # longer than rank 0's --gather-timeout: rank 0 must not wait for it
if sys.argv[1] == "die" and rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
dist.barrier() if sys.argv[1] == "die" else None  # rank 0 waits in a collective for a rank that is gone
dist.destroy_process_group()
