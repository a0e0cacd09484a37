"""Parameter layouts: segment views."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import adapm

from conftest import tiny_gpt2, tiny_llama


def _neox() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           vocab_size=64, max_position_embeddings=32)  # fmt: skip
    return GPTNeoXForCausalLM(config)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, _neox])
def test_views_are_each_segments_view(make) -> None:
    """``ParamLayout.views`` gives every segment's view (same shape, strides and offset into the same
    storage): in one ``split`` for segments that tile a dimension (GPT-2's fused q/k/v), one view per
    segment otherwise (GPT-NeoX's interleaved q/k/v)."""
    model = make()
    opt = adapm.AdaPM(model, lr=1e-3)
    tiled = 0
    for p in model.parameters():
        layout = opt.layout(p)
        x = torch.randn(p.shape)
        expected = [seg.view(x) for seg in layout.segments]
        got = layout.views(x)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert (a.shape, a.stride(), a.storage_offset()) == (b.shape, b.stride(), b.storage_offset())
            assert a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        tiled += layout._tiling is not None
    assert (tiled > 0) == (make is tiny_gpt2)
