"""Planning on fake tensors: the same figures as a real step, byte for byte, without the memory.

Each model small enough to run both ways is measured for real and on fake
tensors (``fake_tensors()``, ``python -m profiler --fake``), and the reports
compared whole, times and host memory aside. A 7B model is then planned as
the README says.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from support import EXAMPLES, NANOGPT, read_json, run_profiler_text, tiny_gpt

from profiler import ProfilerError, fake_tensors, profile

_VARIES = re.compile(r"seconds|^t$|rss|sampler|phase_spans|^notes$")


def _stable(obj):
    """A report without what differs from run to run (times, host memory) or says how it ran (notes)."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not _VARIES.search(k)}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _measure(fake: bool, build, amp: torch.dtype | None = None, steps: int = 3):
    torch.manual_seed(0)
    with fake_tensors() if fake else contextlib.nullcontext():
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
        with profile(model, opt, sample_interval=None) as prof:
            for _ in range(steps):
                x = torch.randint(0, 64, (2, 8))
                with torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext():
                    _, loss = model(x, torch.roll(x, -1, 1))
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)
                print(f"loss {loss.item():.3f}")  # a value read: answered with 0 on fake tensors
    return _stable(prof.to_dict())


CASES = {
    "tied": (lambda: tiny_gpt(), None),
    "untied": (lambda: tiny_gpt(tie_weights=False), None),
    "bf16 autocast": (lambda: tiny_gpt(), torch.bfloat16),
    "fp16 + GradScaler": (lambda: tiny_gpt(), torch.float16),
    "dropout": (lambda: tiny_gpt(dropout=0.1), None),
    "converted by .to(bf16)": (lambda: tiny_gpt().to(torch.bfloat16), None),
    "converted by .half(), untied": (lambda: tiny_gpt(tie_weights=False).half(), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fake_figures_equal_real_ones_byte_for_byte(case):
    build, amp = CASES[case]
    real, fake = _measure(False, build, amp), _measure(True, build, amp)
    assert real["models"][0]["memory"]["steps"][-1]["categories"]["activations"] > 0
    assert fake == real
    assert real["models"][0]["parameters"]["tied"] == fake["models"][0]["parameters"]["tied"]


def test_a_transformers_model_with_checkpointing_plans_as_it_runs():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )

    def build():
        model = transformers.LlamaForCausalLM(config)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model

    def measure(fake):
        torch.manual_seed(0)
        with fake_tensors() if fake else contextlib.nullcontext():
            model = build()
            opt = torch.optim.AdamW(model.parameters())
            with profile(model, opt, sample_interval=None) as prof:
                for _ in range(2):
                    x = torch.randint(0, 64, (2, 16))
                    model(input_ids=x, labels=x).loss.backward()
                    opt.step()
                    opt.zero_grad()
        return _stable(prof.to_dict())

    real, fake = measure(False), measure(True)
    assert real["models"][0]["memory"]["steps"][-1]["gradient_checkpointing"]
    assert fake == real


def test_the_block_leaves_torch_as_it_found_it():
    before = {name: vars(torch.Tensor).get(name) for name in ("item", "tolist", "__bool__", "__float__")}
    apply, save = torch.nn.Module._apply, torch.save
    with fake_tensors() as plan:
        t = torch.ones(3) * 2
        assert t.sum().item() == 0  # not known on fake tensors: answered with 0, counted
        assert bool(t.sum() > 100) is False
        assert torch.tensor(5.0).item() == 5.0  # a value fake mode knows is given as it is
    assert plan.reads == {"item": 1, "bool": 1}
    assert {name: vars(torch.Tensor).get(name) for name in before} == before
    assert torch.nn.Module._apply is apply and torch.save is save
    assert torch.ones(2).sum().item() == 2.0


def test_the_api_says_it_planned_and_saves_no_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"a real checkpoint")
    with fake_tensors():
        model = tiny_gpt()
        opt = torch.optim.AdamW(model.parameters())
        with profile(model, opt, sample_interval=None) as prof:
            x = torch.randint(0, 64, (2, 8))
            _, loss = model(x, x)
            loss.backward()
            opt.step()
        print(f"{loss.item():.3f}")
        torch.save(model.state_dict(), checkpoint)  # nothing real to save: skipped, the file left alone
    notes = prof.report.notes
    assert any(n.startswith("planned on fake tensors") for n in notes), notes
    assert checkpoint.read_bytes() == b"a real checkpoint"
    with pytest.raises(ProfilerError, match="live_peak"), fake_tensors():
        profile(tiny_gpt(), live_peak=True)


def test_a_seven_billion_model_planned_in_one_command(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_profiler_text(
        ["--fake", "--fit", "H100", "--json", out, EXAMPLES / "plan_llama.py", "--model", "llama-2-7b", "--steps", "2"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_json(out)
    (model,) = report["models"]
    params = 6_738_415_616
    assert model["parameters"]["total"] == params
    cats = model["memory"]["steps"][-1]["categories"]
    assert cats["parameters"] == cats["gradients"] == 2 * params  # bf16
    assert cats["optimizer_state"] == 2 * 2 * params + 4 * 291  # AdamW's two moments, a step count per tensor
    assert cats["activations"] > 0
    (card,) = model["fit"]["cards"]
    assert card["card"] == "H100-80GB" and card["fits_at_measured_batch"]
    assert report["script"]["fake"] and any("fake tensors" in n for n in report["notes"])
    assert "step 1: loss 0.0000" in proc.stdout


def test_a_script_fake_tensors_cannot_run_says_so(tmp_path):
    script = tmp_path / "data_dependent.py"
    script.write_text(
        "import torch\n"
        "model = torch.nn.Linear(4, 4)\n"
        "x = torch.randn(8, 4)\n"
        "model(x[x[:, 0] > 0]).sum().backward()\n"  # boolean indexing: the shape depends on the data
    )
    out = tmp_path / "r.json"
    proc = run_profiler_text(["--fake", "--json", out, script], tmp_path)
    assert proc.returncode == 1
    notes = read_json(out)["notes"]
    assert any(n.startswith("the plan stopped: fake tensors cannot run") for n in notes), notes


def test_fake_with_live_peak_is_refused(tmp_path):
    proc = run_profiler_text(["--fake", "--live-peak", str(EXAMPLES / "nanogpt.py")], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--fake" in proc.stderr


def test_the_example_runs_for_real_when_small():
    assert NANOGPT is not None  # (the support module loads the examples)
    pytest.importorskip("transformers")
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_llama", EXAMPLES / "plan_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--layers", "1", "--seq-len", "16", "--steps", "1", "--dtype", "fp32"]) == 0


def test_a_custom_kernel_without_a_fake_implementation_is_named(tmp_path):
    script = tmp_path / "custom.py"
    script.write_text(
        "import torch\n"
        "@torch.library.custom_op('planlib::twice', mutates_args=())\n"
        "def twice(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x * 2\n"
        "model = torch.nn.Linear(4, 4)\n"
        "twice(model(torch.randn(2, 4))).sum().backward()\n"
    )
    out = tmp_path / "r.json"
    proc = run_profiler_text(["--fake", "--json", out, script], tmp_path)
    assert proc.returncode == 1
    notes = read_json(out)["notes"]
    assert any("without a fake implementation" in n and "planlib::twice" in n for n in notes), notes
