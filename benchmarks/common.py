"""Shared helpers for the benchmark scripts in this folder.

Machine description, JSON writing, loading the nanoGPT example, model presets
and one training-step function used by every benchmark, so that "a step" means
the same thing in each of them:

    zero_grad(set_to_none=True) -> forward (autocast on CUDA) -> backward
    (through a GradScaler for fp16) -> optimizer step -> synchronize.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
NANOGPT_PATH = ROOT / "examples" / "nanogpt.py"
NANOGPT_MODULE = "nanogpt_example"

if str(ROOT) not in sys.path:  # so `import profiler` works when run as `python benchmarks/x.py`
    sys.path.insert(0, str(ROOT))

# nanoGPT shapes used by the benchmarks. "seed" is the example's default config.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 100, "block_size": 32},
        "batch": 2,
        "seq": 16,
    },
    "small": {
        "config": {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 8000, "block_size": 128},
        "batch": 4,
        "seq": 128,
    },
    "seed": {"config": {}, "batch": 2, "seq": 256},  # GPTConfig() defaults: 12 x 768, vocab 32000, block 512
}


# --------------------------------------------------------------------------- machine / JSON


def cuda_device_name() -> str | None:
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - a broken driver is "no device" here
        return None
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: enough to tell two result files apart."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": cuda_device_name(),
        "torch_num_threads": torch.get_num_threads(),
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    return obj


def write_json(name: str, data: dict[str, Any], path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` (plus a UTC timestamp) to ``benchmarks/results/<name>.json`` or ``path``."""
    out = Path(path) if path is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = dict(data)
    data.setdefault("timestamp_utc", utc_now())
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    tmp.replace(out)
    return out


def median(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rel_err(measured: float | None, truth: float | None) -> float | None:
    if measured is None or truth is None:
        return None
    if truth == 0:
        return 0.0 if measured == 0 else None
    return (measured - truth) / truth


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads explicitly (default: every core) and return the value used."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but CUDA is not available on this machine")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- nanoGPT


def load_nanogpt():
    """The examples/nanogpt.py module, loaded from its file (registered in sys.modules first)."""
    mod = sys.modules.get(NANOGPT_MODULE)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(NANOGPT_MODULE, NANOGPT_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {NANOGPT_PATH}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[NANOGPT_MODULE] = mod  # dataclasses look the module up while the class body runs
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(NANOGPT_MODULE, None)
        raise
    return mod


def build_nanogpt(preset: str, device: torch.device | str = "cpu", seed: int = 0, **overrides: Any):
    """(model, config, batch, seq) for a preset; ``overrides`` change the GPTConfig fields."""
    ng = load_nanogpt()
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    config = ng.GPTConfig(**{**spec["config"], **overrides})
    model = ng.GPT(config).to(device)
    model.train()
    return model, config, spec["batch"], spec["seq"]


def unique_param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- training step


class TrainStep:
    """One training step of a (logits, loss)-returning model, callable repeatedly.

    ``amp`` is None (fp32), "fp16" (autocast + GradScaler) or "bf16" (autocast).
    ``loss_fn(model, batch)`` returns the loss; the default calls ``model(x, y)``
    and takes element 1 (nanoGPT's ``(logits, loss)``). Batches are made once,
    so the timed work is the step alone.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        *,
        device: torch.device,
        amp: str | None = None,
        lr: float = 3e-4,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model = model
        self.batch = batch
        self.device = torch.device(device)
        self.amp = amp
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, fused=False)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.loss_fn = loss_fn or (lambda m, b: m(b[0], b[1])[1])
        self.last_loss: torch.Tensor | None = None
        self.skipped_steps = 0  # optimizer steps GradScaler skipped (inf/nan gradients)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward(self) -> torch.Tensor:
        with self.autocast():
            return self.loss_fn(self.model, self.batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < before:  # update() shrinks the scale only after a skipped step
                self.skipped_steps += 1
        else:
            loss.backward()
            self.optimizer.step()

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward()
        self.backward_and_step(loss)
        sync(self.device)
        self.last_loss = loss.detach()
        return self.last_loss


def nanogpt_batch(config: Any, batch: int, seq: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=g).to(device)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def nanogpt_step(
    preset: str,
    device: torch.device,
    *,
    amp: str | None = None,
    batch: int | None = None,
    seq: int | None = None,
    seed: int = 0,
    **overrides: Any,
) -> tuple[TrainStep, dict[str, Any]]:
    """A TrainStep on a freshly built nanoGPT preset, and a description of it for the JSON."""
    model, config, b0, s0 = build_nanogpt(preset, device, seed=seed, **overrides)
    batch, seq = batch or b0, seq or s0
    step = TrainStep(model, nanogpt_batch(config, batch, seq, device, seed), device=device, amp=amp)
    desc = {
        "preset": preset,
        "config": {
            k: getattr(config, k)
            for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "tie_weights", "bias", "dropout")
        },
        "params": unique_param_count(model),
        "batch": batch,
        "seq": seq,
        "amp": amp or "fp32",
        "optimizer": "AdamW(fused=False, foreach default)",
        "grad_scaler": amp == "fp16",
        "zero_grad": "set_to_none=True",
    }
    return step, desc


class ClosureStep:
    """One LBFGS step with ``evaluations`` closure evaluations (forward and backward) of a small float64 MLP.

    The shape of a curve-fitting script: the optimizer's ``step(closure)``
    runs the model twenty times, so every per-forward cost of a tool is paid
    twenty times a step. Tolerances are zero, so every step does the same work.
    """

    def __init__(self, device: torch.device, evaluations: int = 20, seed: int = 0) -> None:
        torch.manual_seed(seed)
        nn = torch.nn
        self.device = torch.device(device)
        self.model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.model = self.model.double().to(self.device)
        self.x = torch.randn(512, 4, dtype=torch.float64, device=self.device)
        self.y = self.x.pow(2).sum(1, keepdim=True)
        self.optimizer = torch.optim.LBFGS(
            self.model.parameters(), max_iter=evaluations, history_size=10, tolerance_grad=0, tolerance_change=0
        )
        self.last_loss: torch.Tensor | None = None
        self.skipped_steps = 0

    def _closure(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = (self.model(self.x) - self.y).pow(2).mean()
        loss.backward()
        return loss

    def __call__(self) -> torch.Tensor:
        self.last_loss = self.optimizer.step(self._closure).detach()
        sync(self.device)
        return self.last_loss


def closure_step(device: torch.device, evaluations: int = 20) -> tuple[ClosureStep, dict[str, Any]]:
    """A ClosureStep, and a description of it for the JSON."""
    step = ClosureStep(device, evaluations)
    desc = {
        "preset": "lbfgs",
        "model": "MLP 4-64-64-1, tanh, float64",
        "params": unique_param_count(step.model),
        "batch": 512,
        "seq": None,
        "amp": "fp64",
        "optimizer": f"LBFGS(max_iter={evaluations}, history_size=10, tolerances 0): {evaluations} closure "
        "evaluations a step",
        "grad_scaler": False,
    }
    return step, desc


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- GPU helpers


def nvidia_smi_apps(gpu_uuid: str | None = None) -> dict[str, Any]:
    """``nvidia-smi --query-compute-apps`` as {pid: MiB} on one GPU, or why it could not be read.

    Rows are per (GPU, process): a process with contexts on two GPUs has two,
    so they are filtered by ``gpu_uuid`` (NVML's "GPU-..." form) when given.
    """
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    if out.returncode != 0:
        return {"available": False, "error": (out.stderr or out.stdout).strip()[:500]}
    rows = [[p.strip() for p in line.split(",")] for line in out.stdout.strip().splitlines()]
    rows = [r for r in rows if len(r) >= 3]
    apps = {r[1]: _int_or_none(r[2]) for r in rows if gpu_uuid is None or r[0].lower() == gpu_uuid.lower()}
    return {
        "available": True,
        "raw": out.stdout.strip()[:2000],
        "gpu_uuid": gpu_uuid,
        "apps_mib": apps,
        "uuid_matched_rows": len(apps),
        "our_pid": os.getpid(),
        "ours_mib": apps.get(str(os.getpid())),
    }


def _int_or_none(text: str) -> int | None:
    """nvidia-smi's integer, or None for "[N/A]"."""
    try:
        return int(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- fit planning


def fit_check(
    preset: str,
    device: torch.device,
    *,
    amp: str | None,
    fit_batches: list[int],
    check_batches: list[int],
    seq: int | None = None,
    steps: int = 2,
    target: float = 0.03,
    live_peak: bool = False,
) -> dict[str, Any]:
    """Fit memory against batch size from small batches, then measure larger ones and compare.

    The quantity is what the planner fits: the allocator's peak on CUDA, the sum
    of the measured categories on the CPU. Each batch size gets a freshly built
    model, so one size's optimizer state or cache never flatters another's.
    """
    import gc

    from profiler import profile
    from profiler.results.fit import fit_points, plan_fit, predict_required

    def measure(batch: int) -> dict[str, Any]:
        step, desc = nanogpt_step(preset, device, amp=amp, batch=batch, seq=seq)
        try:
            with profile(step.model, step.optimizer, sample_interval=None, live_peak=live_peak) as prof:
                for _ in range(steps):
                    step()
            return prof.report.models[0].memory
        finally:
            del step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    memories = {b: measure(b) for b in fit_batches}
    first, *rest = fit_batches
    extra = [p for b in rest for p in fit_points(memories[b])]
    fit = plan_fit(memories[first], extra_points=extra)
    checks = []
    for b in check_batches:
        points = fit_points(measure(b))
        actual = points[-1].required if points else None
        predicted = predict_required(fit, b, include_context=False)
        err = rel_err(predicted, actual)
        checks.append(
            {
                "batch": b,
                "predicted": predicted,
                "measured": actual,
                "rel_err": err,
                "within_target": err is not None and abs(err) <= target,
            }
        )
    return {
        "preset": preset,
        "device": str(device),
        "amp": amp or "fp32",
        "seq": seq,
        "quantity": fit.get("source"),
        "fit_batches": fit_batches,
        "method": fit.get("method"),
        "bytes_per_sample": fit.get("bytes_per_sample"),
        "fixed_bytes": fit.get("fixed_bytes"),
        "checks": checks,
        "target": f"|predicted - measured| / measured <= {target}",
        "target_met": all(c["within_target"] for c in checks),
    }
