"""The method's stages, in one list: what each is called, trains, needs and starts from.

The CLI, the pipeline, the checkpoint fingerprint, the export and the report read this list; none keeps its own
copy of a stage's name or title. No heavy imports here, so ``vitask --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage of the method.

    Args:
        name: the key everywhere (config file stem, pipeline folder, ``--stages`` key).
        title: how reports and error messages name it.
        module: the LightningModule class (``module.path.Class``) its config names.
        losses: the loss terms it logs (``train/<term>``), in the order of the objective.
        trains: the parameter groups it updates.
        needs: the checkpoints it requires (``--model.init_args.<option>``).
        starts_from: the stage whose adapters it is initialised from (``init_from``), if any.
    """

    name: str
    title: str
    module: str
    losses: tuple[str, ...] = ()
    trains: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    starts_from: str | None = None

    @property
    def config(self) -> str:
        return f"configs/{self.name}.yaml"

    @property
    def overlay(self) -> str:
        """The stem of this stage's offline overlay: the TSM's own, one shared by every VLM stage."""
        return "tsm" if self.name == "tsm" else "vlm"

    @property
    def command(self) -> str:
        """How a user produces this stage's checkpoint (named in the errors of the stages that need it)."""
        return f"vitask fit --config {self.config} [--config configs/offline/{self.overlay}.yaml]"

    @property
    def class_name(self) -> str:
        return self.module.rsplit(".", 1)[1]


STAGES = {
    s.name: s
    for s in (
        Stage("tsm", "the TSM stage", "vitask_pl.modules.tsm.TSMModule", ("loss",), ("backbone", "heads")),
        Stage(
            "vanilla",
            "vanilla IT",
            "vitask_pl.modules.vanilla.VanillaInstructionTuning",
            ("l_van",),
            ("lora",),
        ),
        Stage(
            "ep",
            "stage 1 (EP)",
            "vitask_pl.modules.vitask.ExemplarPromptTuning",
            ("l_van", "l_ep", "l_rda"),
            ("lora", "connector"),
            ("tsm_ckpt",),
        ),
        Stage(
            "rda_crt",
            "stage 2 (RDA+CRT)",
            "vitask_pl.modules.vitask.RDACRTTuning",
            ("l_van", "l_ep", "l_rda", "l_crt"),
            ("lora",),
            ("tsm_ckpt", "init_from"),
            starts_from="ep",
        ),
    )
}
VLM_STAGES = tuple(name for name in STAGES if name != "tsm")
BY_CLASS = {s.class_name: s for s in STAGES.values()}
BY_MODULE = {s.module: s for s in STAGES.values()}


def stage_of(obj) -> Stage:
    """The :class:`Stage` of a LightningModule instance or class."""
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        if klass.__name__ in BY_CLASS:
            return BY_CLASS[klass.__name__]
    raise KeyError(f"{cls.__name__} is not a vitask stage")
