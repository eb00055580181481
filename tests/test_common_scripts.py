"""Shapes of scripts people run, under ``python -m profiler``, against an independent count:
a recurrent language model fed (sequence, batch) batches and updated by hand, a model reloaded for
evaluation, a Transformer whose input layer is registered after its encoder, a float64 model.

(A GAN rendering samples is in ``test_runner_memory.py``.)
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from support import read_json, run_in_process
from torch import nn

from profiler import analyze, profile

SCRIPTS = __import__("pathlib").Path(__file__).parent / "scripts"


@pytest.fixture
def run(capfd):
    return lambda args, cwd: run_in_process(args, cwd, capfd)


def _model(report: dict, name: str) -> dict:
    return next(m for m in report["models"] if m["name"] == name)


def test_a_sequence_first_lstm_language_model_is_exact_and_reads_its_batch_right(tmp_path, run):
    out, truth = tmp_path / "r.json", tmp_path / "truth.json"
    proc = run(["--no-sampler", "--json", out, SCRIPTS / "word_lm.py", "--truth", truth], tmp_path)
    assert proc.returncode == 0, proc.stderr
    model = _model(read_json(out), "RNNModel")
    steps = model["memory"]["steps"]
    # Every step exact against the walk of its loss's graph (SGD written out by hand).
    assert [s["categories"]["activations"] for s in steps] == read_json(truth)[:3]
    # The input is (bptt 35, batch 20): the LSTM, batch_first=False, says which is which.
    assert steps[-1]["input_shape"] == [35, 20] and steps[-1]["batch_dim"] == 1
    assert "LSTM 'rnn' is batch_first=False" in steps[-1]["batch_source"]
    shape = model["estimates"]["shape"]
    assert (shape["batch"], shape["seq"], shape["hidden"]) == (20, 35, 32)
    assert model["fit"]["measured_batch"] == 20 and model["fit"]["sequence_length"] == 35
    assert "batch 20, seq 35" in proc.stderr
    # The first step of a hand-updated run allocates the gradients: it is the first, the others steady.
    assert [s["kind"] for s in steps] == ["first", "steady", "steady"]
    # Buckets: the encoder is the embedding, the LSTM the block, the decoder (registered first, run last)
    # the head; and the activations follow.
    params = model["parameters"]
    assert params["recurrent_cores"] == ["rnn"] and params["buckets_placed_by"] == "run order"
    assert params["buckets"] == {"embedding": 50 * 32, "block": 16_896, "head": 32 * 50 + 50, "other": 0}
    by_module = {(r["path"], r["bucket"]) for r in model["memory"]["activations_by_module"]}
    assert {("encoder", "embedding"), ("rnn", "block"), ("", "head")} <= by_module
    assert "the recurrent core (rnn) is the block bucket" in proc.stderr


def test_fit_batches_reads_the_batch_a_sequence_first_script_takes(tmp_path, run):
    out = tmp_path / "r.json"
    args = ["--no-sampler", "-q", "--json", out, "--fit-batches", "10,40", "--batch-arg=--batch_size"]
    proc = run([*args, SCRIPTS / "word_lm.py"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    fit = _model(read_json(out), "RNNModel")["fit"]
    assert fit["measured_batches"] == [10, 20, 40] and "linear fit" in fit["method"]
    assert [p["seq"] for p in fit["points"]] == [35, 35, 35]


SEQUENCE_FIRST_NO_HINT = """
import argparse
import torch
from torch import nn

class Bag(nn.Module):  # (sequence, batch) ids in, nothing in the model says so
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.out = nn.Linear(16, 30)

    def forward(self, ids):
        return self.out(self.emb(ids).tanh().mean(0))

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=6)
args = p.parse_args()
model = Bag()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    ids = torch.randint(0, 30, (12, args.batch_size))
    model(ids).logsumexp(1).mean().backward()
    opt.step()
    opt.zero_grad()
"""


def test_fit_batches_finds_the_batch_dimension_where_the_model_does_not_say(tmp_path, run):
    script = tmp_path / "bag.py"
    script.write_text(SEQUENCE_FIRST_NO_HINT)
    out = tmp_path / "r.json"
    proc = run(["--no-sampler", "--json", out, "--fit-batches", "3,24", script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = read_json(out)
    fit = report["models"][0]["fit"]
    assert fit["measured_batches"] == [3, 6, 24] and fit["sequence_length"] == 12
    assert fit["batch_source"].startswith("the input's dimension 1")
    assert any("batch is its input's dimension 1" in n for n in report["notes"])
    # Alone, the report says what it took and why.
    assert report["models"][0]["memory"]["steps"][0]["batch_source"].startswith("the input's first dimension")


RELOADED = """
import torch
from torch import nn
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
torch.save(model, "best.pt")
model = torch.load("best.pt", weights_only=False)  # the best model, reloaded to evaluate it
with torch.no_grad():
    model(torch.randn(4, 8))
"""


def test_a_model_reloaded_for_evaluation_keeps_the_names_straight(tmp_path, run):
    script = tmp_path / "reload.py"
    script.write_text(RELOADED)
    out = tmp_path / "r.json"
    proc = run(["--no-sampler", "--json", out, script], tmp_path)
    assert proc.returncode == 0, proc.stderr
    models = read_json(out)["models"]
    assert [m["name"] for m in models] == ["model", "model#2"]  # the trained one keeps the name it trained under
    assert len(models[0]["memory"]["steps"]) == 2 and models[1]["memory"]["steps"] == []


class ReorderedTransformer(nn.Module):
    """Encoder registered first, its input projection after it (registration order is not run order)."""

    def __init__(self, d=16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.proj_in = nn.Linear(5, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.encoder(self.proj_in(x)))


def test_buckets_follow_the_order_modules_ran_in_once_a_forward_is_seen():
    torch.manual_seed(0)
    model = ReorderedTransformer()
    static = analyze(model).to_dict()["models"][0]["parameters"]
    proj = 5 * 16 + 16
    assert static["buckets_placed_by"] == "registration order"
    assert static["buckets"]["head"] == proj + 16 * 3 + 3  # registered after the encoder: taken for the head
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            model(torch.randn(4, 7, 5)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    entry = prof.to_dict()["models"][0]
    assert entry["parameters"]["buckets_placed_by"] == "run order"
    assert entry["parameters"]["buckets"]["embedding"] == proj  # it ran before the encoder
    assert entry["parameters"]["buckets"]["head"] == 16 * 3 + 3
    step = entry["memory"]["steps"][-1]
    rows = {r["path"]: r["bucket"] for r in entry["memory"]["activations_by_module"]}
    assert rows["proj_in"] == "embedding" and rows["head"] == "head"
    assert step["activations_by_bucket"]["embedding"] > 0  # the first step's saves too, charged after it


def test_a_float64_model_has_its_own_format_in_the_weight_table():
    model = nn.Linear(10, 10).double()
    report = analyze(model)
    weights = report.to_dict()["models"][0]["parameters"]["weight_memory"]
    assert weights["fp64"] == 110 * 8 and weights["fp32"] == 110 * 4
    assert "fp64" in report.render()
    assert "fp64" not in analyze(nn.Linear(10, 10)).to_dict()["models"][0]["parameters"]["weight_memory"]


def test_a_script_updated_by_hand_with_plain_sgd_state_calls_its_first_step_first(tmp_path, run):
    script = tmp_path / "sgd.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            model = torch.nn.Linear(8, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)  # keeps no state
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
            """
        )
    )
    out = tmp_path / "r.json"
    assert run(["--no-sampler", "--json", out, script], tmp_path).returncode == 0
    assert [s["kind"] for s in read_json(out)["models"][0]["memory"]["steps"]] == ["first", "steady", "steady"]
