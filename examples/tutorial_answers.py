"""The tutorial's parameter questions, answered by measurement instead of by hand.

The tutorial (vocab 32000, block 512, n_embd 768, 12 layers) gets three totals
for one model (124,417,536; 134,553,600; "~124 M"), is unsure whether its head
is tied, and asks how many parameters a 24-layer model has. This script builds
each variant of ``examples/nanogpt.py`` on the meta device (no memory, no
weights) and lets ``profiler.analyze`` count it, then sets the tutorial's hand
count beside the measured block, term by term.

    python examples/tutorial_answers.py
"""

from __future__ import annotations

import runpy
from pathlib import Path

import torch
from tabulate import tabulate

import profiler

# The tutorial's own figures (its hand count), quoted so the difference can be shown.
TUTORIAL_BLOCK = 7_084_032
TUTORIAL_TOTAL = 134_553_600
TUTORIAL_PRINTED = 124_417_536


def build(n_layer: int = 12, tied: bool = True, bias: bool = True) -> torch.nn.Module:
    """The example's GPT on the meta device: shapes only, built in milliseconds."""
    ns = runpy.run_path(str(Path(__file__).with_name("nanogpt.py")))  # defines, does not train
    config = ns["GPTConfig"](n_layer=n_layer, tie_weights=tied, bias=bias)
    with torch.device("meta"):
        return ns["GPT"](config)


def main() -> None:
    rows = []
    reports = {}
    for label, kwargs in [
        ("12 layers, tied (nanoGPT)", dict()),
        ("12 layers, untied", dict(tied=False)),
        ("12 layers, tied, no biases", dict(bias=False)),
        ("24 layers, tied", dict(n_layer=24)),
        ("24 layers, untied", dict(n_layer=24, tied=False)),
    ]:
        report = profiler.analyze(build(**kwargs), name=label).models[0]
        reports[label] = report
        inv, b = report.inventory, report.buckets
        rows.append(
            [
                label,
                f"{inv.total:,}",
                f"{inv.total_with_duplicates:,}",
                f"{b.totals['embedding']:,}",
                f"{b.totals['block']:,}",
                f"{b.totals['head']:,}",
            ]
        )
    print("Measured totals (unique parameters; a tied matrix counted once)")
    print(
        tabulate(
            rows,
            headers=["variant", "unique", "with duplicates", "embedding", "blocks", "head"],
            colalign=("left",) + ("right",) * 5,
        )
    )

    base = reports["12 layers, tied (nanoGPT)"]
    trunk = base.buckets.trunks[0]
    biases = sum(p.numel for p in trunk.breakdown if p.name == "bias" and p.type != "LayerNorm")
    norms = sum(p.numel for p in trunk.breakdown if p.type == "LayerNorm")
    untied = reports["12 layers, untied"].inventory.total
    print()
    print("The tutorial's hand count against the measurement")
    print(
        tabulate(
            [
                [
                    "one block",
                    f"{TUTORIAL_BLOCK:,}",
                    f"{trunk.params_per_block:,}",
                    f"{trunk.params_per_block - TUTORIAL_BLOCK:+,}",
                    f"Linear biases (+{biases:,}) were left out; "
                    f"2 LayerNorms per block ({norms:,}), not 4 ({2 * norms:,})",
                ],
                [
                    "whole model, head untied",
                    f"{TUTORIAL_TOTAL:,}",
                    f"{untied:,}",
                    f"{untied - TUTORIAL_TOTAL:+,}",
                    "the block difference x12, plus the final LayerNorm ln_f",
                ],
                [
                    "whole model, as nanoGPT ties it",
                    f"{TUTORIAL_PRINTED:,}",
                    f"{base.inventory.total:,}",
                    f"{base.inventory.total - TUTORIAL_PRINTED:+,}",
                    "none of the variants above has 124,417,536 parameters",
                ],
            ],
            headers=["what", "tutorial", "measured", "difference", "why"],
            colalign=("left", "right", "right", "right", "left"),
        )
    )
    tie = base.inventory.tie_groups[0]
    print()
    print(
        f"Tied: {' = '.join(tie.aliases)} ({tie.numel:,} parameters, counted once, charged to "
        f"'{base.buckets.param_bucket[tie.name]}')"
    )


if __name__ == "__main__":
    main()
