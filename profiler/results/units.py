"""How bytes and counts read in every table (one place, so the text report and the plot agree)."""

from __future__ import annotations

__all__ = ["format_bytes", "format_count"]


def format_count(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def format_bytes(n: int | None) -> str:
    """Binary units, as nvidia-smi and torch.cuda report memory."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
