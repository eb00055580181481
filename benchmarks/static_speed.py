"""Speed of the static inventory, ``profiler.analyze(model)``, on large models.

Models are built from transformers configs with no download (HF_HUB_OFFLINE=1):
Llama 7B and Llama 70B on the meta device (no memory, shapes only) and GPT-2
small with real CPU tensors. The build time is measured apart from the
analysis; ``analyze()`` is timed over several repeats and the median kept.
``report.to_dict()`` and ``render()`` are timed too, for information.

    python benchmarks/static_speed.py
    python benchmarks/static_speed.py --repeats 10 --models llama-70b

Target: analyze() of the 70B model in under 2 s on a 2-core machine.
Writes benchmarks/results/static_speed.json (or --out).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import profiler  # noqa: E402

TARGET_MODEL = "llama-70b"
TARGET_SECONDS = 2.0

MODELS: dict[str, dict[str, Any]] = {
    "llama-7b": {
        "device": "meta",
        "config": dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
        "expected_params": 6_738_415_616,
    },
    "llama-70b": {
        "device": "meta",
        "config": dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
        "expected_params": 68_976_648_192,
    },
    "gpt2-small": {"device": "cpu", "config": {}, "expected_params": 124_439_808},
}


def build(name: str) -> torch.nn.Module:
    spec = MODELS[name]
    if name.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

        cfg = LlamaConfig(**spec["config"])
        with torch.device(spec["device"]):
            return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    return GPT2LMHeadModel(GPT2Config(**spec["config"]))


def bench_model(name: str, repeats: int, build_repeats: int) -> dict[str, Any]:
    build_s = []
    model = None
    for _ in range(build_repeats):
        model = None
        gc.collect()
        t0 = time.perf_counter()
        model = build(name)
        build_s.append(time.perf_counter() - t0)
    assert model is not None
    analyze_s, to_dict_s, render_s = [], [], []
    report = None
    for _ in range(repeats):
        report = None
        gc.collect()
        t0 = time.perf_counter()
        report = profiler.analyze(model)
        analyze_s.append(time.perf_counter() - t0)
    assert report is not None
    for _ in range(max(1, min(3, repeats))):
        t0 = time.perf_counter()
        d = report.to_dict()
        to_dict_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report.render()
        render_s.append(time.perf_counter() - t0)
    params = d["models"][0]["parameters"]
    independent = common.unique_param_count(model)
    out = {
        "device": str(next(model.parameters()).device),
        "class": type(model).__name__,
        "config": MODELS[name]["config"] or "GPT2Config() defaults",
        "n_modules": sum(1 for _ in model.modules()),
        "n_parameter_tensors": len({id(p) for p in model.parameters()}),
        "params_total": params["total"],
        "params_total_with_duplicates": params["total_with_duplicates"],
        "params_bytes": params["bytes"],
        "params_independent_count": independent,
        "params_expected": MODELS[name]["expected_params"],
        "params_match": params["total"] == independent == MODELS[name]["expected_params"],
        "tied_groups": len(params["tied"]),
        "raw": {
            "build_s": [round(x, 6) for x in build_s],
            "analyze_s": [round(x, 6) for x in analyze_s],
            "to_dict_s": [round(x, 6) for x in to_dict_s],
            "render_s": [round(x, 6) for x in render_s],
        },
        "medians": {
            "build_s": common.median(build_s),
            "analyze_s": common.median(analyze_s),
            "to_dict_s": common.median(to_dict_s),
            "render_s": common.median(render_s),
        },
    }
    out["ratios"] = {"analyze_over_build": common.ratio(out["medians"]["analyze_s"], out["medians"]["build_s"])}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--repeats", type=int, default=5, help="analyze() repeats per model")
    p.add_argument("--build-repeats", type=int, default=3, help="model builds per model (the last one is analysed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/static_speed.json)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.build_repeats < 1:
        p.error("--repeats and --build-repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    load_before = common.loadavg()
    t0 = time.perf_counter()
    import transformers  # noqa: PLC0415

    import_s = time.perf_counter() - t0
    results = {name: bench_model(name, args.repeats, args.build_repeats) for name in args.models}
    load_after = common.loadavg()

    measured = results.get(TARGET_MODEL, {}).get("medians", {}).get("analyze_s")
    target = {
        "statement": f"analyze() of the Llama 70B config (meta device) in under {TARGET_SECONDS:.0f} s "
        "on this machine (median of repeats; model build excluded)",
        "max_seconds": TARGET_SECONDS,
        "measured_s": measured,
        "target_met": (measured < TARGET_SECONDS) if measured is not None else None,
    }
    data = {
        "benchmark": "static_speed",
        "machine": common.machine_info(),
        "settings": {
            "models": args.models,
            "repeats": args.repeats,
            "build_repeats": args.build_repeats,
            "torch_num_threads": threads,
            "transformers": transformers.__version__,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
            "transformers_import_s": round(import_s, 3),
        },
        "load": {"loadavg_before": load_before, "loadavg_after": load_after},
        "models": results,
        "medians": {name: r["medians"] for name, r in results.items()},
        "ratios": {name: r["ratios"] for name, r in results.items()},
        "target": target,
        "target_met": target["target_met"],
    }
    # A subset of the models gets its own file: the committed full run stays as it is.
    name = "static_speed" if args.models == list(MODELS) else "static_speed_" + "_".join(args.models)
    path = common.write_json(name, data, args.out)

    rows = [
        [
            name,
            r["device"],
            f"{r['params_total']:,}",
            "yes" if r["params_match"] else "NO",
            f"{r['medians']['build_s']:.3f}",
            f"{r['medians']['analyze_s']:.4f}",
            f"{r['medians']['to_dict_s']:.4f}",
        ]
        for name, r in results.items()
    ]
    print(
        tabulate(rows, headers=["model", "device", "params", "params ok", "build s", "analyze s (median)", "to_dict s"])
    )
    print(
        f"target: 70B analyze() < {TARGET_SECONDS:.0f} s: measured "
        f"{'n/a' if measured is None else f'{measured:.3f} s'} -> target_met={target['target_met']}"
    )
    print(f"load average before {load_before} after {load_after}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
