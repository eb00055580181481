"""Bring every rank's figures to rank 0 once, at the end, without a collective.

A collective is a hazard here: one entered by some ranks only hangs until
the process group's timeout (30 minutes by default), and one inside a hook
can abort the job. So nothing is sent during the run; at the end every rank
writes its own JSON first, then posts a small summary to the job's key-value
store (the TCPStore ``torchrun`` hosts, which outlives
``destroy_process_group()``), and rank 0 alone waits for the others' with a
timeout of its own. A rank that died or hangs leaves a note and the others'
files, never a hang. Plain ``set``/``wait`` on the store are point-to-point:
a rank that posts and leaves blocks nobody.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..tracking.parallel import ParallelSetup, detect_setup
from .report import Report

__all__ = ["DEFAULT_TIMEOUT", "exchange", "gather_ranks", "job_of", "job_store", "rank_path", "rank_summary"]

DEFAULT_TIMEOUT = 30.0  # seconds rank 0 waits for the others' summaries, all together
_PREFIX = "profiler.report"
_LONGEST = 7 * 24 * 3600.0  # a wait longer than a week is no wait anyone asked for (and timedelta's limit)


def rank_path(path: str, rank: int) -> str:
    """Where rank ``rank`` writes its own report beside ``path``: ``run.json`` -> ``run.rank1.json``."""
    p = Path(path)
    suffix = p.suffix or ".json"
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return str(p.with_name(f"{stem}.rank{rank}{suffix}"))


def job_of(report: Report) -> ParallelSetup | None:
    """The distributed job this process is part of: from its measured models, else the live process group."""
    for m in report.models:
        if m.setup is not None:
            return m.setup
    return detect_setup()


def rank_summary(report: Report, setup: ParallelSetup, file: str | None) -> dict[str, Any]:
    """What a rank sends rank 0: its categories per model (a few KiB), and where its own JSON is."""
    models = [{"name": m.name, "parallel": m.extra.get("parallel")} for m in report.models if m.extra.get("parallel")]
    return {
        "rank": setup.rank,
        "world_size": setup.world_size,
        "file": file,
        "measured": bool(models),
        "models": models,
    }


def _key(setup: ParallelSetup, rank: int) -> str:
    return f"{_PREFIX}/{setup.job}/rank{rank}"


def job_store(setup: ParallelSetup) -> Any:
    """The job's key-value store: a client of the TCPStore torchrun's agent hosts, else the default group's.

    torchrun's store is reached from its environment (``MASTER_ADDR``,
    ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE``), the same way on every
    rank, whether or not the script still has a process group.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        try:
            from torch.distributed import TCPStore

            return TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=30))
        except Exception:  # noqa: BLE001 - the agent is gone: fall back
            pass
    return setup.store


def exchange(setup: ParallelSetup, summary: dict[str, Any], timeout: float) -> tuple[dict[int, dict], list[str]]:
    """Post this rank's summary; on rank 0, collect every rank's within ``timeout`` seconds.

    Returns (summaries by rank, notes): both empty on other ranks.
    """
    store = job_store(setup)
    if store is None:
        return ({setup.rank: summary} if setup.rank == 0 else {}), [
            "no key-value store of the job was found: only this rank's figures are here (each rank wrote its own file)"
        ]
    if setup.rank != 0:
        try:
            store.set(_key(setup, setup.rank), json.dumps(summary))
        except Exception as exc:  # noqa: BLE001 - the store is gone (the launcher ended): its file remains
            return {}, [
                f"rank {setup.rank} could not post its figures to the job's store ({type(exc).__name__}: {exc})"
            ]
        return {}, []
    got: dict[int, dict] = {0: summary}
    missing: list[int] = []
    deadline = time.monotonic() + min(max(0.0, timeout), _LONGEST)
    for rank in range(1, setup.world_size):
        key = _key(setup, rank)
        try:
            if not store.check([key]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                store.wait([key], timedelta(seconds=left))
            got[rank] = json.loads(store.get(key))
            store.delete_key(key)
        except Exception:  # noqa: BLE001 - timed out, or the store went away: that rank is missing
            missing.append(rank)
    notes = []
    if missing:
        ranks = ", ".join(map(str, missing))
        notes.append(
            f"rank {ranks} sent no figures within {timeout:g} s (it died, hangs, or is still running): "
            "the table covers the ranks that reported; each rank's own file, if written, is beside --json"
        )
    return got, notes


def gather_ranks(report: Report, setup: ParallelSetup, file: str | None, timeout: float) -> None:
    """Send this rank's figures to rank 0; on rank 0, put every rank's into ``report.ranks``."""
    from .ranks import merge_ranks, unit_hints

    got, notes = exchange(setup, rank_summary(report, setup, file), timeout)
    if setup.rank == 0:
        report.ranks = merge_ranks(got, setup.world_size, notes, unit_hints(report))
    else:
        report.notes.extend(notes)
