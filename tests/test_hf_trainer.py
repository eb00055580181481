"""``python -m profiler examples/hf_trainer.py``: an unmodified Hugging Face Trainer script, in a real
process (needs transformers and accelerate; skipped without them, the other test modules still run)."""

from __future__ import annotations

import pytest
from support import EXAMPLES, read_json, run_profiler

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_hf_trainer_script_is_found_counted_and_its_steps_measured(tmp_path):
    script = EXAMPLES / "hf_trainer.py"
    assert "import profiler" not in script.read_text() and "from profiler" not in script.read_text()
    got = run_profiler(["--steps", "2", "--json", "out.json", script], cwd=tmp_path, timeout=300)
    err = got.stderr.decode(errors="replace")
    assert got.returncode == 0, err[-3000:]
    assert got.stdout.decode().splitlines()[-1] == "done"
    assert "Traceback" not in err
    # GPT-2, tied head: n_layer 2, n_embd 32, vocab 100, n_positions 32.
    V, P, C, L = 100, 32, 32, 2
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = V * C + P * C + L * per_block + 2 * C
    assert expected == 29_696
    data = read_json(tmp_path / "out.json")
    gpt2 = [m for m in data["models"] if m["class"] == "GPT2LMHeadModel"]
    assert len(gpt2) == 1 and data["models"][0] is gpt2[0], data["models"]
    assert gpt2[0]["parameters"]["total"] == expected
    assert gpt2[0]["parameters"]["total_with_duplicates"] == expected + V * C
    assert "GPT2LMHeadModel" in err
    # Its steps, under the Trainer's own loop.
    mem = gpt2[0]["memory"]
    assert mem["optimizer"] is not None
    assert len(mem["steps"]) == 2 and mem["steps"][-1]["categories"]["optimizer_state"] > 0
    assert mem["steps"][-1]["categories"]["activations"] > 0
    # The Trainer calls model(**inputs): the first step's batch is in keyword arguments.
    assert [s["input_shape"] is not None for s in mem["steps"]] == [True, True]
