import time

import pytest
import torch

from vitask_pl.errors import ConfigError, OfflineError
from vitask_pl.models.tsm import TaskSpecificModel, create_backbone

BACKBONES = [  # (name, kwargs): a CNN, a ViT at 28 px, a ConvNeXt-style net at 32 px
    ("resnet18", {}),
    ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 2}),
    ("convnext_atto", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), BACKBONES)
def test_backbones_forward_backward_from_uint8(name, kwargs):
    size = 32 if name.startswith("convnext") else 28
    tsm = TaskSpecificModel(name, image_size=size, backbone_kwargs=kwargs)
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    feats = tsm(images)
    assert feats.shape == (3, tsm.num_features)
    feats.sum().backward()
    assert all(p.grad is not None for p in tsm.parameters() if p.requires_grad)
    patches = tsm.features(images, "patch")
    assert patches.ndim == 3 and patches.shape[0] == 3 and patches.shape[-1] == tsm.num_features


def test_vit_cls_feature_is_the_pre_logits_token():
    tsm = TaskSpecificModel("vit_tiny_patch16_224", image_size=28, backbone_kwargs={"patch_size": 7, "depth": 1}).eval()
    x = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    tokens = tsm.backbone.forward_features(tsm.normalize(x))
    assert torch.allclose(tsm(x), tsm.backbone.forward_head(tokens, pre_logits=True))
    assert tsm.features(x, "patch").shape == (2, 16, 192)  # prefix (CLS) token dropped


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match=r"--model.init_args.backbone: timm has no model 'resnet181'.*did you mean"):
        create_backbone("resnet181")


def test_pretrained_offline_fails_fast_with_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OfflineError, match="pretrained: false"):
        create_backbone("resnet18.a1_in1k", pretrained=True)
    assert time.monotonic() - start < 10
