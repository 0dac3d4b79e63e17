"""The bench's FLOP accounting: the parameter counts against an independent walk over the modules, and the
formula against hand computations."""

import pytest
import torch

from vitask_pl.flops import Counts, counts, decoder_flops, step_flops
from vitask_pl.models.vlm import LoraSettings, build_vlm

C = Counts(decoder=10, lora=2, layers=1, width=4, vocab=8, vision=3, patches=5)


def test_decoder_flops_by_hand():
    # 2 tokens, no cache: each attends to 1 position on average; per token 4*10 + 6*2 + 12*1*4*1 = 100
    assert decoder_flops(C, rows=1, length=2) == 200
    # 3 rows of 2 tokens after 4 cached positions: 4 + 1 attended; per token 40 + 12 + 12*4*5 = 292
    assert decoder_flops(C, rows=3, length=2, past=4) == 3 * 2 * 292


def test_step_flops_by_hand():
    labels = torch.full((2, 6), -100)
    labels[:, 4] = 7  # one response token per row
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": labels}
    head, image = 4 * 4 * 8, 2 * 3 * 5  # per response row, per image
    assert step_flops(C, batch, variant="vanilla", slots=1, prefix=3) == decoder_flops(C, 2, 6) + 2 * head + 2 * image
    fused = decoder_flops(C, 6, 7) + 6 * head + 4 * image
    assert step_flops(C, batch, variant="fused", slots=1, prefix=3) == fused
    assert step_flops(C, batch, variant="full", slots=1, prefix=3) == decoder_flops(C, 2, 6) + 2 * 5 * head + 2 * image
    separate = decoder_flops(C, 2, 7) + decoder_flops(C, 4, 6) + 6 * head + 6 * image
    assert step_flops(C, batch, variant="separate", slots=1, prefix=3) == separate
    shared = decoder_flops(C, 4, 3) + decoder_flops(C, 6, 4, past=3) + 6 * head + 4 * image
    assert step_flops(C, batch, variant="shared", slots=1, prefix=3) == shared
    assert shared < fused  # the prefix of the EP rows is not recomputed
    with pytest.raises(ValueError, match="unknown variant"):
        step_flops(C, batch, variant="nope", slots=1, prefix=3)


def test_counts_match_a_walk_over_the_linear_layers(tiny_dirs):
    vlm, _ = build_vlm(tiny_dirs["internvl"], lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    c = counts(vlm, patches=16)
    inner = vlm.model.model

    def linear_weights(module, lora: bool) -> int:  # independent: the nn.Linear modules, not parameter names
        return sum(
            m.weight.numel()
            for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and ("lora_" in name) == lora
        )

    assert c.decoder == linear_weights(inner.language_model.layers, lora=False)
    assert c.lora == linear_weights(inner.language_model.layers, lora=True) > 0
    assert c.layers == len(inner.language_model.layers) and c.width == vlm.hidden_size
    assert c.vocab == vlm.model.get_output_embeddings().weight.shape[0]
    tower = linear_weights(inner.vision_tower, False) + linear_weights(inner.multi_modal_projector, False)
    assert c.vision == tower
