"""Measured training steps of real third-party architectures, checked against counts made without
the profiler's hooks (needs transformers; skipped without it, the other test modules still run).

* transformers models (GPT-2, BERT, T5, Llama, Mistral, OPT) built from tiny
  configs, no download, trained for two AdamW steps under ``profile()``, with
  both the eager and the SDPA attention (both match the independent count);
* GPT-2 with gradient checkpointing (HF's default, reentrant and non-reentrant)
  and with a frozen (possibly tied) embedding;
* a ViT, whose sequence length comes from its blocks' input.

The reference for activations is a walk of the autograd graph of the loss
(``autograd_walk``), made right after the forward of the same step.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from autograd_walk import graph_saved_bytes
from support import (
    BUCKETS,
    assert_no_hooks,
    hook_state,
    memory,
    rows_by_bucket,
    timeline_sum,
    trainable_bytes,
    unique_param_bytes,
    unique_params,
)
from torch import nn

from profiler import profile
from profiler.tracking import OUTSIDE

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# ----------------------------------------------------------------------------- transformers models

V, B, T, T_DEC = 99, 3, 10, 7


def _gpt2(attn: str, **kw) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2, attn_implementation=attn, **kw
    )
    return transformers.GPT2LMHeadModel(config)


def _bert(attn: str) -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=V,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return transformers.BertForMaskedLM(config)


def _t5(attn: str) -> nn.Module:
    config = transformers.T5Config(
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        vocab_size=V,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return transformers.T5ForConditionalGeneration(config)


def _llama(attn: str) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config)


def _mistral(attn: str) -> nn.Module:
    config = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
        sliding_window=4,
        attn_implementation=attn,
    )
    return transformers.MistralForCausalLM(config)


def _opt(attn: str) -> nn.Module:
    config = transformers.OPTConfig(
        hidden_size=32,
        ffn_dim=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        attn_implementation=attn,
    )
    return transformers.OPTForCausalLM(config)


def lm_batch() -> dict:
    ids = torch.randint(1, V, (B, T))
    return {"input_ids": ids, "labels": ids}


def seq2seq_batch() -> dict:
    return {"input_ids": torch.randint(1, V, (B, T)), "labels": torch.randint(1, V, (B, T_DEC))}


ARCHS = {
    "gpt2": (_gpt2, lm_batch),
    "bert": (_bert, lm_batch),
    "t5": (_t5, seq2seq_batch),
    "llama": (_llama, lm_batch),
    "mistral": (_mistral, lm_batch),
    "opt": (_opt, lm_batch),
}


def build(arch: str, attn: str = "sdpa", seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch][0](attn, **kw)
    model.train()  # dropout on, as in training (GPT-2, BERT, T5 and OPT have some by default)
    return model


def train_steps(model: nn.Module, make_batch, steps: int = 2, *, walk: bool = True, seed: int = 1):
    """``steps`` AdamW steps of ``model`` under ``profile()``; the graph walk of each step's loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    walks, losses = [], []
    torch.manual_seed(seed)
    hooks_before = hook_state(model)
    with profile(model, sample_interval=None) as prof:
        for _ in range(steps):
            out = model(**make_batch())
            if walk:
                walks.append(graph_saved_bytes(out.loss, model))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach())
    assert_no_hooks(model, hooks_before)
    return prof, opt, walks, losses


def train_plain(model: nn.Module, make_batch, steps: int = 2, seed: int = 1) -> list[torch.Tensor]:
    """The same loop without the profiler: the reference for 'training is unchanged'."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(seed)
    losses = []
    for _ in range(steps):
        out = model(**make_batch())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return losses


def check_step(step: dict, model: nn.Module, expected_activations: int) -> None:
    """What every measured step of a transformers model must satisfy."""
    cat = step["categories"]
    train_bytes = trainable_bytes(model)
    n_trainable = len(unique_params(p for p in model.parameters() if p.requires_grad))
    assert step["complete"]
    assert (step["forwards"], step["backwards"], step["optimizer_steps"]) == (1, 1, 1)
    assert cat["parameters"] == unique_param_bytes(model)
    assert cat["gradients"] == train_bytes
    state = step["optimizer_state"]["by_name"]
    assert state["exp_avg"] == state["exp_avg_sq"] == train_bytes
    assert state["step"] == n_trainable * torch.tensor(0.0).element_size()
    assert cat["optimizer_state"] == sum(state.values())
    assert cat["autocast_copies"] == 0
    assert cat["activations"] == expected_activations
    by_bucket = step["activations_by_bucket"]
    assert set(by_bucket) == set(BUCKETS)
    assert sum(by_bucket.values()) == cat["activations"]
    assert by_bucket["block"] > 0
    assert by_bucket["block"] == max(by_bucket.values())
    # The timeline's growth events add up to the same totals.
    assert timeline_sum(step, "activations") == cat["activations"]
    assert timeline_sum(step, "gradients") == cat["gradients"]


def check_by_module(mem: dict, model: nn.Module, prof) -> None:
    step = mem["steps"][-1]
    assert mem["activations_step"] == step["index"]
    rows = mem["activations_by_module"]
    assert sum(r["bytes"] for r in rows) == step["categories"]["activations"]
    assert rows_by_bucket(rows) == step["activations_by_bucket"]  # the rows' labels agree with the buckets
    paths = dict(model.named_modules())
    assert all(r["path"] in paths or r["path"] == OUTSIDE for r in rows)
    assert all(r["bytes"] > 0 for r in rows)
    assert sum(r["bytes"] for r in mem["activations_by_block_module"]) == step["categories"]["activations"]
    for rec in prof.tracker.steps:  # every step, not just the reported one
        assert sum(rec.activations_by_module.values()) == rec.activations
        assert sum(rec.activations_by_bucket.values()) == rec.activations


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_two_adamw_steps_are_exact(arch, attn):
    model = build(arch, attn)
    assert model.config._attn_implementation == attn
    prof, _, walks, losses = train_steps(model, ARCHS[arch][1])
    assert_no_hooks(model)
    mem = memory(prof)
    steps = mem["steps"]
    assert [s["kind"] for s in steps] == ["first", "steady"]
    assert [s["index"] for s in steps] == [1, 2]
    assert all(w > 0 for w in walks)
    for step, walk in zip(steps, walks):
        check_step(step, model, walk)
        assert step["input_shape"] == [B, T] and step["input_is_tokens"]
    assert steps[0]["baseline"]["optimizer_state"] == 0
    assert steps[1]["baseline"]["optimizer_state"] == steps[0]["categories"]["optimizer_state"]
    check_by_module(mem, model, prof)
    # Every block of every trunk holds activations, labelled "block".
    rows = mem["activations_by_module"]
    blocks = [b for t in prof.report.models[0].buckets.trunks for b in t.block_paths]
    assert blocks
    for block in blocks:
        inside = [r for r in rows if r["path"] == block or r["path"].startswith(block + ".")]
        assert inside and all(r["bucket"] == "block" for r in inside), block
    # The profiler changed nothing: the same training without it ends with the same weights.
    twin = build(arch, attn)
    plain_losses = train_plain(twin, ARCHS[arch][1])
    assert [float(x) for x in plain_losses] == [float(x) for x in losses]
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_tied_weights_have_one_gradient():
    """GPT-2 (wte = lm_head), BERT (decoder weight and bias), T5 (four aliases), OPT: counted once."""
    expected_aliases = {"gpt2": 1, "bert": 2, "t5": 3, "opt": 1, "llama": 0}
    for arch, extra in expected_aliases.items():
        model = build(arch)
        aliases = [p for _, p in model.named_parameters(remove_duplicate=False)]
        with_duplicates = sum(p.numel() * p.element_size() for p in aliases)
        assert len(aliases) - len(unique_params(aliases)) == extra
        prof, _, _, _ = train_steps(model, ARCHS[arch][1], walk=False)
        grads = memory(prof)["steps"][-1]["categories"]["gradients"]
        assert grads == unique_param_bytes(model)
        if extra:
            assert grads < with_duplicates


def test_t5_four_way_tie_gradient_counted_once():
    model = build("t5")
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared
    assert model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared
    prof, _, walks, _ = train_steps(model, seq2seq_batch)
    step = memory(prof)["steps"][-1]
    with_duplicates = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False))
    assert step["categories"]["gradients"] == with_duplicates - 3 * shared.numel() * shared.element_size()
    assert step["categories"]["gradients"] == unique_param_bytes(model)
    assert step["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model)
    assert step["categories"]["activations"] == walks[-1]
    # Two trunks, encoder and decoder: both hold activations in the block bucket.
    rows = memory(prof)["activations_by_module"]
    assert any(r["path"].startswith("encoder.block.") and r["bucket"] == "block" for r in rows)
    assert any(r["path"].startswith("decoder.block.") and r["bucket"] == "block" for r in rows)


@pytest.mark.parametrize("ckpt_kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_gpt2_gradient_checkpointing(ckpt_kwargs):
    plain = build("gpt2")
    prof_plain, _, _, _ = train_steps(plain, lm_batch, walk=False)
    base = memory(prof_plain)["steps"][-1]

    model = build("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradient_checkpointing_enable is a deprecated alias in transformers 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        assert model.is_gradient_checkpointing
    # The non-reentrant checkpoint recomputes when a saved tensor is read, so
    # the walk is only made for the reentrant one (whose blocks save nothing).
    walk = ckpt_kwargs == {"use_reentrant": True}
    prof, _, walks, _ = train_steps(model, lm_batch, walk=walk)  # must not crash; hooks checked inside
    mem = memory(prof)
    step = mem["steps"][-1]
    cat = step["categories"]
    assert step["complete"] and [s["kind"] for s in mem["steps"]] == ["first", "steady"]
    assert step["gradient_checkpointing"] and not base["gradient_checkpointing"]
    formulas = prof.to_dict()["models"][0]["estimates"]["formulas"]
    assert all(
        any("gradient checkpointing" in m for m in f["misses"]) for f in formulas if f["name"].startswith("korthikanti")
    )
    assert cat["gradients"] == unique_param_bytes(model)
    assert step["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model)
    assert 0 < cat["activations"] < base["categories"]["activations"]
    assert cat["activations"] == sum(step["activations_by_bucket"].values())
    assert sum(r["bytes"] for r in mem["activations_by_module"]) == cat["activations"]
    # What checkpointing keeps of a block is its input (B, T, C) in float32; the
    # layers around the trunk are not checkpointed and hold what they held.
    hidden = B * T * model.config.n_embd * 4
    by_module = {(r["path"], r["bucket"]): r["bytes"] for r in mem["activations_by_module"]}
    for i in range(model.config.n_layer):
        assert by_module[f"transformer.h.{i}", "block"] == hidden
    assert step["activations_by_bucket"]["block"] == model.config.n_layer * hidden
    for bucket in ("embedding", "head", "other"):
        assert step["activations_by_bucket"][bucket] == base["activations_by_bucket"][bucket]
    if walk:
        assert walks[-1] == cat["activations"]


@pytest.mark.parametrize("frozen", ["transformer.wpe.weight", "transformer.wte.weight"])
def test_gpt2_frozen_embedding_drops_exactly_its_gradient(frozen):
    ref = build("gpt2")
    prof_ref, _, _, _ = train_steps(ref, lm_batch, walk=False)
    ref_grads = memory(prof_ref)["steps"][-1]["categories"]["gradients"]

    model = build("gpt2")
    weight = model.get_parameter(frozen)
    weight.requires_grad_(False)  # wte is tied to lm_head: one tensor, frozen once
    before = weight.detach().clone()
    frozen_bytes = weight.numel() * weight.element_size()
    prof, _, walks, _ = train_steps(model, lm_batch)
    assert_no_hooks(model)
    mem = memory(prof)
    for step, walk in zip(mem["steps"], walks):
        check_step(step, model, walk)
    cat = mem["steps"][-1]["categories"]
    assert ref_grads - cat["gradients"] == frozen_bytes
    assert cat["parameters"] == unique_param_bytes(model)  # frozen weights are still weights
    assert mem["steps"][-1]["optimizer_state"]["by_name"]["exp_avg"] == unique_param_bytes(model) - frozen_bytes
    assert torch.equal(weight, before)
    check_by_module(mem, model, prof)


def test_a_vision_transformer_gets_its_sequence_length_from_its_blocks_input():
    # Pixels in, no token ids: the blocks' (batch, patches + 1, hidden) input says what the formula needs.
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters())
    with profile(model, sample_interval=None) as prof:
        for _ in range(2):
            logits = model(pixel_values=torch.randn(B, 3, 32, 32)).logits
            nn.functional.cross_entropy(logits, torch.randint(0, 10, (B,))).backward()
            opt.step()
            opt.zero_grad()
    entry = prof.report.models[0]
    assert entry.memory["steps"][-1]["trunk_input_shape"] == [B, (32 // 8) ** 2 + 1, 32]
    shape = entry.estimates["shape"]
    assert (shape["batch"], shape["seq"], shape["hidden"], shape["layers"], shape["heads"]) == (B, 17, 32, 2, 4)
    assert shape["seq_source"] == "from the first block's input"
    flash = next(f for f in entry.estimates["formulas"] if f["name"] == "korthikanti-flash")
    assert flash["applicable"] and flash["measured"] > 0
    assert "seq 17 (from the first block's input)" in prof.render()
