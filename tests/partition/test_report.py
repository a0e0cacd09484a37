"""The partition report: rows, totals, the AdamW reference, and agreement with the real state."""

from __future__ import annotations

import torch

import adapm

from conftest import batches, tiny_gpt2, tiny_llama, train


def test_report_bytes_equal_allocated_state_after_a_step() -> None:
    for make in (tiny_gpt2, tiny_llama):
        for cls in (adapm.AdaPM, adapm.AdaPMMini):
            model = make()
            opt = cls(model, lr=1e-3)
            predicted = opt.partition_report()
            assert adapm.state_bytes(opt) == 0  # lazy state
            train(model, opt, batches(96, 1))
            assert adapm.state_bytes(opt) == predicted.state_bytes


def test_adamw_reference_is_torch_adamw_state() -> None:
    model = tiny_gpt2()
    report = adapm.AdaPM(model, lr=1e-3).partition_report()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, adamw, batches(96, 1))
    assert report.adamw_state_bytes == adapm.state_bytes(adamw)


def test_report_table_text() -> None:
    report = adapm.AdaPMMini(tiny_gpt2(), lr=1e-3).partition_report()
    text = str(report)
    assert "transformer.h.1.attn.c_attn.weight[V]" in text
    assert "of AdamW" in text
    assert report.ratio_to_adamw == report.state_bytes / report.adamw_state_bytes
    assert set(report.by_momentum()) == {"none", "lowrank", "full"}
    row = report.rows[0]
    assert (row.name, row.shape, row.momentum, row.second_moment, row.rank) == (
        "transformer.wte.weight",
        (96, 32),
        "none",
        "block",
        0,
    )


def test_adapm_mini_state_under_8_percent_on_gpt2_124m_config() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())  # 12 layers, n_embd 768: GPT-2 124M, not allocated
    mini = adapm.AdaPMMini(model, lr=1e-3).partition_report()
    full = adapm.AdaPM(model, lr=1e-3).partition_report()
    assert mini.ratio_to_adamw < 0.08, mini.ratio_to_adamw
    assert 0.5 < full.ratio_to_adamw < 0.6, full.ratio_to_adamw
