"""Trunks and buckets of real third-party architectures built from their configs, no download
(needs transformers; skipped without it, the other test modules still run)."""

from __future__ import annotations

import time

import pytest
import torch
from support import check_buckets, inventory_and_buckets, unique_numel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def test_gpt2_small_default_config_exact():
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    V, P, C, L = 50257, 1024, 768, 12
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = V * C + P * C + L * per_block + 2 * C
    assert expected == 124_439_808
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, 124_439_808)
    assert inv.total_with_duplicates == 124_439_808 + V * C
    assert [(t.path, t.blocks, t.params_per_block) for t in b.trunks] == [("transformer.h", L, per_block)]
    assert b.totals == {"embedding": V * C + P * C, "block": L * per_block, "head": 2 * C, "other": 0}
    assert [set(g.aliases) for g in inv.tie_groups] == [{"transformer.wte.weight", "lm_head.weight"}]


def test_bert_masked_lm_ties():
    H, L, FF, V, P = 32, 2, 37, 99, 64
    config = transformers.BertConfig(
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=FF,
        vocab_size=V,
        max_position_embeddings=P,
    )
    model = transformers.BertForMaskedLM(config)
    emb = V * H + P * H + 2 * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * FF + FF) + (FF * H + H) + 2 * H
    head = (H * H + H) + 2 * H + V  # transform.dense, transform.LayerNorm, the output bias
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, emb + L * layer + head)
    groups = sorted((set(g.aliases) for g in inv.tie_groups), key=sorted)
    assert groups == [
        {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"},
        {"cls.predictions.bias", "cls.predictions.decoder.bias"},
    ]
    assert [(t.path, t.blocks) for t in b.trunks] == [("bert.encoder.layer", L)]
    assert b.totals == {"embedding": emb, "block": L * layer, "head": head, "other": 0}
    assert b.param_bucket["bert.embeddings.word_embeddings.weight"] == "embedding"


@pytest.mark.parametrize("num_layers", [2, 3])
def test_t5_four_way_tie_and_two_trunks(num_layers):
    d, kv, heads, ff, V, buckets = 32, 8, 4, 37, 99, 32
    config = transformers.T5Config(
        d_model=d,
        d_kv=kv,
        d_ff=ff,
        num_layers=num_layers,
        num_heads=heads,
        vocab_size=V,
        relative_attention_num_buckets=buckets,
    )
    model = transformers.T5ForConditionalGeneration(config)
    attn = 4 * d * heads * kv  # q, k, v, o without biases
    enc_block = attn + d + (2 * d * ff) + d
    dec_block = 2 * attn + 2 * d + (2 * d * ff) + d
    rel = buckets * heads  # only block 0 of each stack has the relative attention bias table
    expected = V * d + (num_layers * enc_block + rel + d) + (num_layers * dec_block + rel + d)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, expected)

    assert [set(g.aliases) for g in inv.tie_groups] == [
        {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    ]
    assert inv.total_with_duplicates == expected + 3 * V * d
    assert [(t.path, t.blocks) for t in b.trunks] == [("encoder.block", num_layers), ("decoder.block", num_layers)]
    enc, dec = b.trunks
    assert enc.params == num_layers * enc_block + rel
    assert dec.params == num_layers * dec_block + rel
    assert enc.params_per_block in (enc_block, enc_block + rel)
    assert b.param_bucket["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "block"
    assert b.totals == {
        "embedding": V * d,
        "block": enc.params + dec.params,
        "head": 2 * d,  # the final layer norms of the encoder and the decoder
        "other": 0,
    }


def test_bart_encoder_decoder():
    d, ff, V, P, L = 32, 37, 99, 64, 2
    config = transformers.BartConfig(
        d_model=d,
        encoder_layers=L,
        decoder_layers=L,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=ff,
        decoder_ffn_dim=ff,
        vocab_size=V,
        max_position_embeddings=P,
    )
    model = transformers.BartForConditionalGeneration(config)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, unique_numel(model))
    assert [set(g.aliases) for g in inv.tie_groups] == [
        {
            "model.shared.weight",
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
            "lm_head.weight",
        }
    ]
    assert [(t.path, t.blocks) for t in b.trunks] == [("model.encoder.layers", L), ("model.decoder.layers", L)]
    assert b.totals["other"] == 0
    # Token and learned position tables (offset by 2 in BART) are before each trunk. Each stack's
    # layernorm_embedding runs before its layers but is registered after them, so whether it is
    # called embedding or head is a matter of registration order; together they are exact.
    pos = (P + 2) * d
    assert b.totals["embedding"] >= V * d + 2 * pos
    assert b.totals["embedding"] + b.totals["head"] == V * d + 2 * pos + 2 * (2 * d)
    assert b.totals["block"] == sum(t.params for t in b.trunks)


def test_whisper_encoder_decoder():
    config = transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        vocab_size=99,
        max_source_positions=30,
        max_target_positions=40,
        num_mel_bins=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    model = transformers.WhisperForConditionalGeneration(config)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, unique_numel(model))
    assert [set(g.aliases) for g in inv.tie_groups] == [{"model.decoder.embed_tokens.weight", "proj_out.weight"}]
    assert [(t.path, t.blocks) for t in b.trunks] == [("model.encoder.layers", 2), ("model.decoder.layers", 2)]
    assert b.module_bucket["model.encoder.conv1"] == "embedding"
    assert b.module_bucket["model.encoder.layer_norm"] == "head"
    assert b.totals["head"] == 2 * 2 * 32  # the two final layer norms (proj_out is the tied embedding)


def test_llama_7b_on_meta_exact_and_fast():
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    H, FF, V, L = 4096, 11008, 32000, 32
    layer = 4 * H * H + 3 * H * FF + 2 * H
    expected = V * H + L * layer + H + V * H
    assert expected == 6_738_415_616
    start = time.perf_counter()
    inv, b = inventory_and_buckets(model)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"analyze() took {elapsed:.1f} s"  # the real target (< 2 s) lives in benchmarks
    check_buckets(model, inv, b, expected)
    assert inv.tie_groups == []
    assert [(t.path, t.blocks, t.params_per_block) for t in b.trunks] == [("model.layers", L, layer)]
    assert b.totals == {"embedding": V * H, "block": L * layer, "head": H + V * H, "other": 0}
    assert inv.weight_memory()["bf16"] == 2 * expected


def test_mixtral_fused_experts():
    C, FF, V, L, E = 32, 37, 99, 2, 4
    config = transformers.MixtralConfig(
        hidden_size=C,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        num_local_experts=E,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, unique_numel(model))
    assert [(t.path, t.blocks) for t in b.trunks] == [("model.layers", L)]
    assert b.totals["embedding"] == V * C
    assert b.totals["head"] == C + V * C
    assert b.totals["other"] == 0


def _deepseek_v3():
    config = transformers.DeepseekV3Config(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        vocab_size=64,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    )
    return transformers.DeepseekV3ForCausalLM(config)


def test_deepseek_v3_first_dense_layer_is_a_block():
    model = _deepseek_v3()
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, unique_numel(model))
    assert b.module_bucket["model.layers.0"] == "block"
    assert b.totals["embedding"] == 64 * 32


def test_switch_transformers_alternating_sparse_blocks():
    config = transformers.SwitchTransformersConfig(
        d_model=16,
        d_kv=4,
        d_ff=24,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        num_experts=4,
        vocab_size=50,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
    )
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    inv, b = inventory_and_buckets(model)
    check_buckets(model, inv, b, unique_numel(model))
    assert [(t.path, t.blocks) for t in b.trunks] == [("encoder.block", 4), ("decoder.block", 4)]
