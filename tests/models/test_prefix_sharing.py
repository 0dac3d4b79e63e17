"""Prefix sharing is exact: the EP / plain / negative views with their common prefix run once give the same logits
and the same gradients as every view run whole, for each of the four families."""

from types import SimpleNamespace

import pytest
import torch

from vitask_pl.data.chat import ChatBatch
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.losses import crt, rda_kl, response_nll
from vitask_pl.models.families import FAMILY_NAMES
from vitask_pl.models.vitask_model import VITaskModel
from vitask_pl.models.vlm import LoraSettings, build_vlm

from ..conftest import sharpen

FLAGS = ["dermamnist", "chestmnist", "pneumoniamnist"]  # instructions of three lengths: ragged suffixes
WIDTH = 16  # TSM feature width fed to the connector


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def setup(request, tiny_dirs, synth_root):
    vlm, processor = build_vlm(tiny_dirs[request.param], lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model = VITaskModel(vlm, SimpleNamespace(width=WIDTH), exemplar_tokens=2)
    sharpen(model)  # LoRA and connector too: every position matters
    model.eval()  # no dropout: both paths must see the same function
    ds = MedMNISTDataModule(synth_root, FLAGS, 28, num_workers=0).dataset("train", negatives=True)
    rows = [0, 5, int(ds.offsets[1]), int(ds.offsets[2]) + 1]
    batch = ChatBatch(processor, ds.specs)([ds[i] for i in rows])
    features = torch.randn(len(rows), WIDTH, generator=torch.Generator().manual_seed(0))
    return request.param, model, batch, features, processor.tokenizer.pad_token_id or 0


def run(model, batch, features, pad_id, *, prefix_sharing):
    model.zero_grad(set_to_none=True)
    views = model.fused_views(batch, features, pad_id, negatives=True, prefix_sharing=prefix_sharing)
    t = views["targets"]
    loss = (
        response_nll(views["plain"], t)
        + response_nll(views["ep"], t)
        + rda_kl(views["plain"], views["ep"])
        + crt(views["plain"], views["neg"], t)
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in views.items()}, grads


def test_shared_prefix_equals_whole_views(setup):
    family, model, batch, features, pad_id = setup
    whole, whole_grads = run(model, batch, features, pad_id, prefix_sharing=False)
    shared, shared_grads = run(model, batch, features, pad_id, prefix_sharing=True)
    assert torch.equal(shared["targets"], whole["targets"])
    for view in ("ep", "plain", "neg"):
        torch.testing.assert_close(shared[view], whole[view], rtol=1e-4, atol=1e-4, msg=f"{family} {view}")
    assert set(shared_grads) == set(whole_grads)
    assert any("connector" in n for n in whole_grads) and any("lora_" in n for n in whole_grads)
    for name, grad in whole_grads.items():  # fp32 summation order differs: compare on the gradient's own scale
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-4 * scale, msg=f"{family} {name}")
    assert not torch.allclose(whole["ep"], whole["plain"], atol=1e-3)  # the exemplar reaches the logits
