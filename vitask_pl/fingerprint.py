"""What a checkpoint was trained as, stored in it, and checked before any of its weights are loaded.

Loading LoRA weights into another VLM family, a connector into another TSM width, a head into another class
space or a stage-1 checkpoint where a TSM is expected would fail deep inside ``load_state_dict`` (or, worse,
silently half-load with ``strict=False``). The record under ``checkpoint["vitask"]`` turns each of those into
one line that names both sides.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.stages import BY_CLASS, STAGES

KEY = "vitask"
# Fields that must agree; ``datasets`` is handled apart (stage 2 may train on a subset of stage 1's datasets).
FIELDS = ("family", "hidden_size", "lora_r", "tsm_width", "backbone", "image_size")


def _lora_rank(model: torch.nn.Module) -> int | None:
    for m in model.modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {}):
            return int(m.r["default"])
    return None


def fingerprint(module: torch.nn.Module) -> dict:
    """The facts a checkpoint of ``module`` is only valid with."""
    model = getattr(module, "model", None)  # the VLM stages' VITaskModel; the TSM stage has none
    vlm = getattr(model, "vlm", None)
    record = {
        "stage": type(module).__name__,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "datasets": [s.flag for s in module.specs],
        "image_size": module.hparams.get("image_size"),
    }
    shares = {s.flag: s.shares for s in module.specs if s.shares}
    if shares:  # imported datasets that use a MedMNIST flag's label space
        record["shares"] = shares
    if vlm is not None:
        record.update(
            family=vlm.family.name,
            hidden_size=int(vlm.hidden_size),
            lora_r=_lora_rank(vlm.model),
            vlm=str(module.hparams.get("vlm")),
        )
    if getattr(model, "source", None) is not None:
        record["tsm_width"] = int(model.source.width)
    if hasattr(module, "tsm"):
        record.update(backbone=module.hparams.get("backbone"), tsm_width=int(module.tsm.num_features))
    return record


def describe(record: dict) -> str:
    stage = BY_CLASS.get(record.get("stage"))
    parts = [stage.title if stage else str(record.get("stage"))]
    parts += [f"{k} {record[k]}" for k in FIELDS if record.get(k) is not None]
    parts.append(f"datasets {record.get('datasets')}")
    return ", ".join(parts)


def load(path: str | Path, option: str, produced_by: str = "`vitask fit`", *, mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``: a checkpoint is data, never code; a bad file is one line.

    ``mmap=True`` maps the tensors instead of reading them: for a look at the record before Lightning loads
    the same file in full.
    """
    if not Path(path).is_file():
        raise MissingFileError(f"{option}: {path} not found; produce it with {produced_by}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, foreign pickle, objects outside the weights-only allowlist
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{option}: {path} cannot be read as a checkpoint ({reason}); pass a checkpoint written by {produced_by}."
        ) from err


def read(checkpoint: dict, path: str | Path, option: str) -> dict:
    record = checkpoint.get(KEY)
    if not isinstance(record, dict):
        raise ConfigError(
            f"{option}: {path} is not a vitask checkpoint (it has no '{KEY}' record); pass a checkpoint "
            f"written by `vitask fit`."
        )
    return record


def compare(
    theirs: dict,
    ours: dict,
    *,
    path: str | Path,
    option: str,
    stages: tuple[str, ...] | None = None,
    same_datasets: bool = False,
) -> None:
    """Raise unless checkpoint record ``theirs`` fits a run described by ``ours`` (a partial record is fine).

    The datasets must be the same list where dataset positions are baked in (the TSM's joint head, a resumed
    fit); elsewhere each of the run's datasets must be among the checkpoint's, or share the label space of one
    of them (an imported external set graded like a MedMNIST flag: the paper's external validation).
    """
    allowed = stages or (ours["stage"],)
    clash = [k for k in FIELDS if theirs.get(k) is not None and ours.get(k) is not None and theirs[k] != ours[k]]
    if theirs.get("stage") not in allowed:
        clash.insert(0, "stage")
    if same_datasets or ours["stage"] == STAGES["tsm"].class_name:
        unseen = [] if theirs.get("datasets") == ours["datasets"] else ours["datasets"]
    else:
        known, shares = theirs.get("datasets", []), ours.get("shares", {})
        unseen = [d for d in ours["datasets"] if d not in known and shares.get(d) not in known]
    if clash or unseen:
        what = ", ".join(clash + (["datasets"] if unseen else []))
        raise ConfigError(
            f"{option}: {path} differs in {what}: it holds {describe(theirs)}; this run builds "
            f"{describe(ours)}. Pass a checkpoint trained with this configuration."
        )


def check(
    checkpoint: dict,
    module: torch.nn.Module,
    *,
    path: str | Path,
    option: str = "--ckpt_path",
    stages: tuple[str, ...] | None = None,
    same_datasets: bool = False,
) -> None:
    """Refuse ``checkpoint`` unless it was trained as what ``module`` is (or one of ``stages``)."""
    compare(
        read(checkpoint, path, option),
        fingerprint(module),
        path=path,
        option=option,
        stages=stages,
        same_datasets=same_datasets,
    )


def stamp(checkpoint: dict, module: torch.nn.Module) -> None:
    checkpoint[KEY] = fingerprint(module)


def save_untrained(module, path) -> str:
    """``module``'s weights, hyperparameters and vitask record, the part of a `vitask fit` checkpoint that the stages
    read, written without a Trainer (the bench and the GPU check time models whose weights do not matter)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    stamp(checkpoint, module)
    torch.save(checkpoint, path)
    return str(path)


def check_resume(module, checkpoint: dict) -> None:
    """``on_load_checkpoint`` of every stage: the checkpoint ``--ckpt_path`` named must be of this configuration."""
    trainer = module._trainer  # None when loaded by hand (notebooks); `.trainer` would raise there
    # A resumed fit needs the same datasets, in order: a batch's dataset index means the same dataset to the data
    # and to the optimizer's state. An evaluation may score a tuned model on other datasets of its label spaces.
    fitting = trainer is None or trainer.state.fn == "fit"
    check(checkpoint, module, path=getattr(trainer, "ckpt_path", None) or "the checkpoint", same_datasets=fitting)
