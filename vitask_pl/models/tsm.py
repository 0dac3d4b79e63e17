"""The task-specific model (TSM): any timm backbone by name, fed uint8 images, giving pre-logits features."""

from __future__ import annotations

import torch
from torch import nn

from vitask_pl.atomic import save_torch
from vitask_pl.data.catalog import SPLITS, check_size
from vitask_pl.data.collate import ImageBatch
from vitask_pl.data.datamodule import MedMNISTDataModule
from vitask_pl.data.files import missing_file_message, npz_path
from vitask_pl.errors import ConfigError, MissingFileError, OfflineError, suggest
from vitask_pl.fingerprint import load, read
from vitask_pl.stages import BY_CLASS, STAGES

FEATURE_KINDS = ("pooled", "patch")


def create_backbone(name: str, *, pretrained: bool = False, image_size: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: the classifier removed, so ``forward`` gives pooled features.

    Fixed-size backbones (ViTs) are built for ``image_size`` unless ``img_size`` is given in ``kwargs``;
    convolutional ones take any size. Arguments set to ``None`` are dropped so timm's defaults survive.
    """
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ConfigError(
            f"--model.init_args.backbone: timm has no model {name!r}{suggest(arch, timm.list_models())}; "
            f"list them with `python -c \"import timm; print(timm.list_models('*vit*'))\"`."
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cfg = timm.models.get_pretrained_cfg(arch)
    if image_size is not None and cfg is not None and cfg.fixed_input_size and "img_size" not in kwargs:
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as err:
        if pretrained and ("offline" in str(err).lower() or "connect" in str(err).lower() or "hub" in str(err).lower()):
            raise OfflineError(
                f"--model.init_args.pretrained true: the weights of {name!r} cannot be fetched offline ({err.__class__.__name__}); "
                f"set pretrained: false, or download them once online (they are cached under ~/.cache/huggingface)."
            ) from None
        raise


class ImageNormalizer(nn.Module):
    """uint8 ``(B, 3, H, W)`` -> normalised float with the backbone's mean/std and channel count."""

    def __init__(self, mean, std, in_chans: int = 3):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.in_chans = in_chans

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if self.in_chans == 1:
            x = x.mean(dim=1, keepdim=True)
        return (x - self.mean[:, : x.shape[1]]) / self.std[:, : x.shape[1]]


class TaskSpecificModel(nn.Module):
    """Backbone with its own input normalisation; features are what exemplar prompting feeds the VLM.

    Args:
        backbone: timm model name, e.g. ``resnet18`` or ``vit_base_patch16_224.augreg_in21k``.
        pretrained: load timm's pretrained weights (needs the hub or its cache).
        image_size: input size for fixed-size backbones (ViTs).
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``patch_size``, ``drop_path_rate``).
    """

    def __init__(self, backbone: str, *, pretrained: bool = False, image_size: int | None = None, backbone_kwargs=None):
        super().__init__()
        import timm

        self.backbone = create_backbone(
            backbone, pretrained=pretrained, image_size=image_size, **(backbone_kwargs or {})
        )
        cfg = timm.data.resolve_data_config({}, model=self.backbone)
        self.normalize = ImageNormalizer(cfg["mean"], cfg["std"], in_chans=cfg["input_size"][0])
        self.num_features = self.backbone.num_features

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, then match the backbone's dtype (bf16-true / DeepSpeed bf16 cast the weights)
        return self.normalize(images).to(next(self.backbone.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> pooled pre-logits feature ``(B, D)`` (the CLS token for a ViT)."""
        return self.backbone(self._inputs(images))

    def features(self, images: torch.Tensor, kind: str = "pooled") -> torch.Tensor:
        """``pooled``: ``(B, D)``; ``patch``: ``(B, T, D)`` tokens (ViT) or flattened feature map (CNN)."""
        if kind == "pooled":
            return self(images)
        if kind != "patch":
            raise ConfigError(f"feature kind {kind!r} is not one of {FEATURE_KINDS}.")
        tokens = self.backbone.forward_features(self._inputs(images))
        if tokens.ndim == 4:  # CNN feature map (B, C, H, W)
            return tokens.flatten(2).transpose(1, 2)
        return tokens[:, getattr(self.backbone, "num_prefix_tokens", 0) :]


def load_tsm(path: str, *, option: str = "--model.init_args.tsm_ckpt") -> tuple[TaskSpecificModel, dict]:
    """Rebuild a trained TSM (frozen, eval mode) from a TSM-stage checkpoint, with its hyperparameters.

    Loaded with ``weights_only=True``: a checkpoint is data, never code.
    """

    tsm = STAGES["tsm"]
    ckpt = load(path, option, f"`{tsm.command}`")
    stage = read(ckpt, path, option).get("stage")
    if stage != tsm.class_name:
        what = BY_CLASS[stage].title if stage in BY_CLASS else stage
        raise ConfigError(
            f"{option}: {path} is a checkpoint of {what}, not of the TSM stage; pass the checkpoint of `{tsm.command}`."
        )
    hp = ckpt.get("hyper_parameters", {})
    if "backbone" not in hp or not any(k.startswith("tsm.") for k in ckpt.get("state_dict", {})):
        raise ConfigError(f"{option}: {path} is not a TSM-stage checkpoint (no backbone/tsm weights in it).")
    tsm = TaskSpecificModel(hp["backbone"], image_size=hp.get("image_size"), backbone_kwargs=hp.get("backbone_kwargs"))
    tsm.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("tsm.")})
    return tsm.eval().requires_grad_(False), hp


@torch.no_grad()
def extract_features(tsm: TaskSpecificModel, loader, kind: str = "pooled") -> dict[str, torch.Tensor]:
    """Features of every image a deterministic loader yields (batches from :class:`ImageBatch`).

    Returns ``features`` ``(N, D)`` (``(N, T, D)`` for ``patch``), ``dataset`` and ``index`` ``(N,)``.
    """
    device = next(tsm.parameters()).device
    out = {"features": [], "dataset": [], "index": []}
    for batch in loader:
        out["features"].append(tsm.features(batch["images"].to(device), kind).float().cpu())
        out["dataset"].append(batch["dataset"])
        out["index"].append(batch["index"])
    return {k: torch.cat(v) for k, v in out.items()}


def export_features(
    ckpt: str,
    out: str,
    root: str = "data/medmnist",
    split: str = "test",
    kind: str = "pooled",
    size: int | None = None,
    batch_size: int = 256,
) -> str:
    """Write the TSM's pre-logits feature of every image of a split to ``out`` (a ``torch.save`` file).

    Args:
        ckpt: a TSM-stage checkpoint.
        out: output file; never overwritten.
        root: MedMNIST folder; the datasets and size are the checkpoint's own.
        split: train, val or test.
        kind: ``pooled`` (CLS / pooled feature) or ``patch`` tokens.
        size: image size (default: the checkpoint's).
        batch_size: images per forward.
    """
    from pathlib import Path

    if Path(out).exists():
        raise ConfigError(f"--out: {out} already exists; choose another path (exports are never overwritten).")
    if split not in SPLITS:
        raise ConfigError(f"--split: {split!r}; use one of {', '.join(SPLITS)}.")
    if kind not in FEATURE_KINDS:
        raise ConfigError(f"--kind: {kind!r}; use one of {', '.join(FEATURE_KINDS)}.")
    tsm, hp = load_tsm(ckpt, option="--ckpt")
    size = check_size(size, option="--size") if size is not None else hp["image_size"]
    for flag in hp["datasets"]:  # checked here, so that the error names --root, not the data module's --data.root
        path = npz_path(root, flag, size)
        if not path.is_file():
            raise MissingFileError(missing_file_message(path, flag, size, option="--root"))
    dm = MedMNISTDataModule(root, hp["datasets"], size, eval_batch_size=batch_size, num_workers=0)
    feats = extract_features(tsm, dm.loader(split, ImageBatch(dm.specs)), kind)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_torch(feats | {"datasets": dm.flags, "split": split, "kind": kind}, out)
    print(f"{len(feats['index'])} {kind} features of width {feats['features'].shape[-1]} written to {out}")
    return out
