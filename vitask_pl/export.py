"""``vitask export``: a VLM stage checkpoint as standard files, usable without vitask or Lightning.

A stage checkpoint holds the adapters only (LoRA, and for the VITask stages the TSM connector); the frozen base
is rebuilt from its ``vlm`` hyperparameter. The export writes the LoRA in PEFT format next to the processor, so
``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(BASE), DIR)`` is the trained model; the
connector as safetensors plus the JSON needed to rebuild it; and with ``merge`` the base with the LoRA merged in.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from vitask_pl.atomic import is_nonempty, overwrite_error, publish_dir, sibling
from vitask_pl.errors import ConfigError
from vitask_pl.fingerprint import load, read
from vitask_pl.models.feature_cache import file_sha256
from vitask_pl.models.vitask_model import ADAPTER_PREFIX as CONNECTOR_PREFIX
from vitask_pl.models.vlm import LoraSettings, load_vlm, lora_target_names, resolve_source
from vitask_pl.stages import STAGES, VLM_STAGES

VANILLA = STAGES["vanilla"].module
TSM = STAGES["tsm"].module
VLM_MODULES = tuple(STAGES[s].module for s in VLM_STAGES)
VLM_PREFIX = "model.vlm.model."  # every VLM stage holds the transformers model here; LoRA keys continue its paths
STAGE_CKPT = (
    "a vanilla, ep or rda_crt stage checkpoint written by `vitask fit` (its checkpoints/last.ckpt or best-*.ckpt)"
)


def read_checkpoint(path: str, option: str = "CKPT") -> tuple[dict, str]:
    """A VLM stage checkpoint (``weights_only``: data, never code) and the module class its record names."""

    if Path(path).expanduser().is_dir():
        raise ConfigError(f"{option}: {path} is a directory, not a checkpoint file; pass {STAGE_CKPT}.")
    checkpoint = load(Path(path).expanduser(), option, STAGE_CKPT)
    cls = read(checkpoint, path, option).get("module")
    if cls == TSM:
        raise ConfigError(
            f"{option}: {path} is a TSM-stage checkpoint (backbone {checkpoint['hyper_parameters'].get('backbone')}), "
            f"which has no LoRA or connector; pass {STAGE_CKPT} (`vitask features` exports a TSM's features)."
        )
    if cls not in VLM_MODULES:
        raise ConfigError(f"{option}: {path} was written by {cls}, not by a VLM stage; pass {STAGE_CKPT}.")
    return checkpoint, cls


def lora_weights(checkpoint: dict, cls: str, path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's LoRA tensors keyed by the transformers model's own module paths (``model.language_model...``)."""
    prefix = VLM_PREFIX
    lora = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
    if not lora:
        raise ConfigError(f"CKPT: {path} holds no LoRA weights; pass {STAGE_CKPT}.")
    stray = [k for k in lora if not k.startswith(prefix)]
    if stray:
        raise ConfigError(
            f"CKPT: {path} has LoRA weight {stray[0]} outside {prefix}*, where {cls} keeps its VLM; "
            f"its keys and its module class disagree."
        )
    return {k[len(prefix) :]: v for k, v in lora.items()}


def lora_key(peft_key: str) -> str:
    """A LoRA key as PEFT saves it (``base_model.model.X.lora_A.weight``) back to the model's (``X.lora_A.default
    .weight``): the inverse of what :func:`load_lora` and ``save_pretrained`` do to :func:`lora_weights`' keys."""
    return re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", peft_key.removeprefix("base_model.model."))


def connector_key(key: str) -> str:
    """A ``connector.safetensors`` key back to the stage's state-dict key."""
    return CONNECTOR_PREFIX + key


EXPORT_RECORD = "vitask_export.json"  # the provenance an export folder holds; its presence makes a folder one


def read_export(folder: Path, option: str = "--model") -> tuple[dict, dict, dict, str | None]:
    """What rebuilds an exported stage: ``(hyperparameters, fingerprint record, adapter tensors keyed as the
    stage's state dict, its TSM copy or None)``; the inverse of :func:`export`."""
    from safetensors.torch import load_file

    provenance = json.loads((folder / EXPORT_RECORD).read_text())
    if "hyper_parameters" not in provenance:
        raise ConfigError(
            f"{option}: {folder} was exported by an earlier vitask, without the stage's hyperparameters; export the "
            f"checkpoint again (`vitask export CKPT --out DIR --force`)."
        )
    adapters = {VLM_PREFIX + lora_key(k): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    if provenance["connector"]:
        adapters.update({connector_key(k): v for k, v in load_file(folder / "connector.safetensors").items()})
    tsm = folder / "tsm.ckpt" if provenance.get("tsm") else None
    return provenance["hyper_parameters"], provenance["record"], adapters, str(tsm) if tsm else None


def load_lora(peft_model, weights: dict[str, torch.Tensor], path: str, base: str) -> None:
    """Copy ``weights`` into ``peft_model``'s LoRA; every tensor must land on a LoRA parameter of the same shape and
    every LoRA parameter must get one, so an export is never silently partial."""
    ours = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    mapped = {"base_model.model." + k: v for k, v in weights.items()}
    unused = [k for k, v in mapped.items() if k not in ours or ours[k].shape != v.shape]
    missing = [k for k in ours if k not in mapped]
    if unused or missing:
        first = f"{unused[0]} has no place" if unused else f"nothing for {missing[0]}"
        raise ConfigError(
            f"CKPT: {path}'s LoRA does not fit the base {base} with its lora settings ({first}; "
            f"{len(unused)} unused, {len(missing)} missing); the base must be the model it was trained on."
        )
    result = peft_model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def connector_files(checkpoint: dict, path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The TSM connector's tensors (``TSMConnector`` state-dict keys) and what rebuilds it and feeds it."""
    tensors = {
        k[len(CONNECTOR_PREFIX) :]: v.contiguous()
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(CONNECTOR_PREFIX)
    }
    if "net.1.weight" not in tensors:
        raise ConfigError(
            f"CKPT: {path} is a VITask stage checkpoint without its TSM connector (no "
            f"{CONNECTOR_PREFIX}net.1.weight); pass {STAGE_CKPT}."
        )
    hp = checkpoint["hyper_parameters"]
    hidden, width = tensors["net.1.weight"].shape
    exemplar = hp.get("exemplar") or {}
    num_tokens = exemplar.get("tokens", 1)
    assert tensors["net.3.weight"].shape[0] == hidden * num_tokens, "connector and exemplar_tokens disagree"
    config = {
        "class": "vitask_pl.models.exemplar.TSMConnector",
        "init_args": {"feature_dim": width, "hidden_dim": hidden, "num_tokens": num_tokens},
        "feature_kind": exemplar.get("feature_kind", "pooled"),
        "tsm_ckpt": hp.get("tsm_ckpt"),
        "datasets": hp.get("datasets"),
        "image_size": hp.get("image_size"),
    }
    return tensors, config


def _readme(provenance: dict) -> str:
    notes = []
    if provenance["connector"]:
        notes.append(
            "`connector.safetensors` + `connector.json`: the TSM connector (`TSMConnector(**init_args)`), fed the "
            "features of `tsm_ckpt`; its exemplar tokens follow the last image token."
        )
    if provenance.get("tsm"):
        notes.append("`tsm.ckpt`: a copy of that TSM checkpoint.")
    if provenance["merged"]:
        notes.append(
            "`merged/`: the base with the LoRA merged in, `AutoModelForImageTextToText.from_pretrained(DIR/merged)`."
        )
    tail = "".join(f"\n{note}\n" for note in notes)
    return f"""# VITask export

From `{provenance["checkpoint"]}` (sha256 `{provenance["sha256"]}`), written by `{provenance["module"]}`.
Base: `{provenance["base"]}`. Details in `vitask_export.json`.

```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{provenance["base"]}"), "DIR")
processor = AutoProcessor.from_pretrained("DIR")
```

Classify image files with it: `vitask classify --model DIR --dataset NAME --images '[scans/]' --out predictions.csv`.
{tail}"""


def _write(tmp: Path, checkpoint: dict, ckpt: str, cls: str, merge: bool) -> dict:
    """Everything the export holds, into ``tmp``; returns the provenance written to ``vitask_export.json``."""
    import dataclasses

    from huggingface_hub import ModelCard
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    hp = checkpoint["hyper_parameters"]
    options = hp.get("vlm_options") or {}
    settings = LoraSettings(**(hp.get("lora") or {}))
    option = f"CKPT {ckpt}: its vlm"
    source = resolve_source(hp["vlm"], hp.get("image_size", 28), option)
    base = str(Path(source).resolve()) if Path(source).is_dir() else source  # a hub id stays an id
    # sdpa whatever training used: the export runs no forward, and flash_attention_2 would need a GPU here.
    model, processor, family = load_vlm(
        source,
        dtype=options.get("dtype", "float32"),
        image_size=hp.get("image_size", 28),
        trust_remote_code=options.get("trust_remote_code", False),
        option=option,
    )
    names = lora_target_names(model, family, settings)
    # The LoraConfig freeze_and_add_lora trained with, inside a PeftModel this time, so it saves in PEFT format.
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        bias="none",
        base_model_name_or_path=base,
    )
    peft_model = get_peft_model(model, config)  # adapters in float32 over a bf16/fp16 base, as in training
    load_lora(peft_model, lora_weights(checkpoint, cls, ckpt), ckpt, base)

    provenance = {
        "checkpoint": str(Path(ckpt).expanduser().resolve()),
        "sha256": file_sha256(Path(ckpt).expanduser()),
        "module": cls,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "vlm": hp["vlm"],
        "base": base,
        "family": family.name,
        "dtype": options.get("dtype", "float32"),
        "lora": dataclasses.asdict(settings),
        "connector": cls != VANILLA,
        "merged": merge,
        "record": checkpoint["vitask"],
        # what rebuilds the stage (datasets, cards, image size, LoRA, exemplar, options): `vitask classify` reads it
        "hyper_parameters": {k: v for k, v in hp.items() if not k.startswith("_")},
    }
    if cls != VANILLA:
        tensors, connector = connector_files(checkpoint, ckpt)
        save_file(tensors, tmp / "connector.safetensors")
        # The TSM travels with the export, so it answers with the exemplar on another machine too.
        tsm = connector["tsm_ckpt"]
        provenance["tsm"] = "tsm.ckpt" if tsm and Path(tsm).is_file() else None
        if provenance["tsm"]:
            shutil.copyfile(tsm, tmp / "tsm.ckpt")
            provenance["tsm_sha256"] = file_sha256(tmp / "tsm.ckpt")
        else:
            print(
                f"export: the stage's TSM {tsm} is not there, so the export holds none; classifying with the "
                f"exemplar will need --tsm_ckpt"
            )
        (tmp / "connector.json").write_text(json.dumps(connector, indent=2) + "\n")
    peft_model.save_pretrained(tmp)
    card = ModelCard.load(tmp / "README.md")  # PEFT's template card: keep its hub metadata, say what this is instead
    card.text = _readme(provenance)
    card.save(tmp / "README.md")
    processor.save_pretrained(tmp)
    (tmp / EXPORT_RECORD).write_text(json.dumps(provenance, indent=2) + "\n")
    if merge:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp / "merged")
        processor.save_pretrained(tmp / "merged")
    return provenance


def export(ckpt: str, *, out: str, merge: bool = False, force: bool = False) -> Path:
    """Export a VLM stage checkpoint: LoRA (PEFT format), TSM connector, processor; --merge adds a merged model.

    The base is the checkpoint's ``vlm`` (a hub id, a local directory, or ``tiny:<family>``); load the export with
    ``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(BASE), DIR)``. The folder appears
    whole or not at all: it is written next to ``out`` and renamed into place.

    Args:
        ckpt: A vanilla, ep or rda_crt stage checkpoint written by `vitask fit` (e.g. .../checkpoints/last.ckpt).
        out: Folder to write (adapter_config.json, adapter_model.safetensors, connector.*, processor files).
        merge: Also write OUT/merged: the base with the LoRA merged in, loadable without peft.
        force: Replace --out if it exists and is not empty.

    Returns:
        The folder written.
    """

    checkpoint, cls = read_checkpoint(ckpt)
    target = Path(out).expanduser()
    if is_nonempty(target) and not force:
        raise overwrite_error(target)
    if Path(ckpt).expanduser().resolve().is_relative_to(target.resolve()):
        raise ConfigError(f"--out: {out} contains CKPT {ckpt}, which --force would delete; choose another --out.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(target, "tmp")
    tmp.mkdir()
    try:
        provenance = _write(tmp, checkpoint, ckpt, cls, merge)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not publish_dir(tmp, target, replace=force):
        raise overwrite_error(target)  # another process wrote --out while this one was exporting
    parts = ["LoRA (PEFT)"] + ["TSM connector"] * provenance["connector"] + ["merged model"] * merge
    print(
        f"export: wrote {', '.join(parts)} of {ckpt} ({cls.rsplit('.', 1)[-1]}, base {provenance['base']}) to {target}"
    )
    return target
