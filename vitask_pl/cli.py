"""The ``vitask`` command: Lightning's fit/validate/test/predict plus the project's own tools.

Trainer subcommands go through :class:`VitaskCLI` (a LightningCLI in subclass mode, so a config names
``class_path``/``init_args`` for model and data). The other subcommands are plain functions whose signatures
are their options (jsonargparse reads them), so they take lists the same way: ``--datasets '[a,b]'`` or ``all``.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

from vitask_pl.errors import UserError

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOLS = {
    "data synth": ("vitask_pl.data.synth:synthesize", "write synthetic MedMNIST files in the official format"),
    "data check": ("vitask_pl.data.check:check", "validate MedMNIST files (keys, dtypes, shapes, labels, MD5)"),
    "data import": (
        "vitask_pl.data.importer:import_dataset",
        "your images (class folders or a CSV; PNG/JPEG/TIFF/DICOM) as a dataset in the MedMNIST layout",
    ),
    "classify": (
        "vitask_pl.classify:classify",
        "classify image files or folders (PNG/JPEG/TIFF/DICOM) with a tuned stage or an export: CSV/JSON per image",
    ),
    "features": ("vitask_pl.models.tsm:export_features", "export a trained TSM's features of one split"),
    "tiny-vlm": ("vitask_pl.models.tiny:tiny_vlm", "build a tiny random-weight VLM of a real family, offline"),
    "bench": ("vitask_pl.bench:bench", "step time / peak memory ratios of the training and evaluation variants"),
    "pipeline": (
        "vitask_pl.pipeline:pipeline",
        "the whole method: TSM -> vanilla -> EP -> RDA+CRT -> evaluation -> report",
    ),
    "report": ("vitask_pl.report:report", "regenerate results.json, report.md and plots of a pipeline run"),
    "export": (
        "vitask_pl.export:export",
        "write a stage checkpoint's LoRA (PEFT format) + connector; --merge for a merged HF model",
    ),
}

POSITIONAL = {
    "report",
    "export",
}  # `vitask report RUN_DIR`, `vitask export CKPT --out DIR`; the others take --options only

HELP = """usage: vitask <command> [options]

Trainer commands (LightningCLI; `vitask fit --help` for all options):
  fit          train a stage:       vitask fit --config configs/tsm.yaml --config configs/offline/tsm.yaml
  validate     evaluate on val
  test         evaluate on test, write metrics.json
  predict      per-sample predictions

Tools:
{tools}

Errors that are the input's fault print one line; set VITASK_DEBUG=1 for the traceback.
"""


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI; ``run=False`` only instantiates (tests, notebooks)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities import rank_zero_warn

    from vitask_pl.atomic import AtomicCheckpointIO, remove_temporaries
    from vitask_pl.console import lines_off_terminal, quiet
    from vitask_pl.data.cards import cards_of, resolve_datasets
    from vitask_pl.data.catalog import resolve_flags
    from vitask_pl.data.datamodule import MedMNISTDataModule
    from vitask_pl.fingerprint import compare, load, read
    from vitask_pl.guards import (
        MARGIN_BYTES,
        FiniteLoss,
        check_output_dir,
        checkpoint_bytes,
        refuse_fresh_over_earlier,
    )
    from vitask_pl.resume import ExactResume, LastCheckpoint
    from vitask_pl.stages import STAGES

    class VitaskCLI(LightningCLI):
        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            # The module prints one compact table of the test results (eval/results.py) in place of Lightning's
            # row per metric; `vitask test --verbose true` brings Lightning's back.
            if subcommand == "test":
                parser.set_defaults(verbose=False)
            return parser

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            # Facts the data knows reach the model here, so no config types them twice.
            data = ("data.init_args.datasets", "data.init_args.root")  # an imported dataset's card is under its root
            parser.link_arguments(data, "model.init_args.datasets", compute_fn=resolve_datasets)
            parser.link_arguments(data, "model.init_args.cards", compute_fn=cards_of)
            parser.link_arguments("data.init_args.size", "model.init_args.image_size")
            # Two checkpointers in {default_root_dir}/checkpoints: the best on validation, and `last.ckpt`, saved
            # every N optimizer steps (mid-epoch) and at the end, which `--ckpt_path last` resumes from.
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
            parser.set_defaults(
                {
                    "checkpoint.monitor": "val/avg/acc",
                    "checkpoint.mode": "max",
                    "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                    "checkpoint.auto_insert_metric_name": False,  # metric keys hold slashes
                    "checkpoint.save_last": False,  # last.ckpt is last_checkpoint's
                }
            )

        def _parse_ckpt_path(self) -> None:
            # Lightning reads --ckpt_path's hyperparameters here, before any vitask code runs: read it safely
            # first, so a truncated or foreign file is one line naming the option, not an unpickling traceback.
            # Lightning then replaces the model's arguments with the checkpoint's. A resumed fit must serve the
            # same datasets (by position: the same list). An evaluation of a VLM stage keeps the run's data and a
            # TSM named for the run: a tuned model is scored on another dataset of its label spaces, and with
            # another TSM plugged in (VITask^plug), neither re-tuned.
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else None
            path = config.get("ckpt_path") if config else None
            if not (path and Path(path).is_file()):
                return super()._parse_ckpt_path()
            record = read(load(path, "--ckpt_path", mmap=True), path, "--ckpt_path")
            data = config.data.init_args
            cards = cards_of(data.datasets, data.root)
            run = {
                "stage": config.model.class_path.rsplit(".", 1)[-1],
                "datasets": resolve_flags(data.datasets, cards=cards),
            }
            if cards:
                run["shares"] = {name: card["shares"] for name, card in cards.items() if card["shares"]}
            evaluating = subcommand != "fit" and run["stage"] != STAGES["tsm"].class_name
            compare(record, run, path=path, option="--ckpt_path", same_datasets=not evaluating)
            tsm_ckpt = config.model.init_args.get("tsm_ckpt")
            super()._parse_ckpt_path()
            if evaluating:
                model = self.config[subcommand].model.init_args
                model.datasets, model.cards = run["datasets"], cards
                if tsm_ckpt:
                    model.tsm_ckpt = tsm_ckpt

        def before_instantiate_classes(self) -> None:
            # A fixed checkpoint folder (not one per logger version), so a later run finds `last.ckpt` to resume.
            config = self.config[self.subcommand] if self.subcommand else self.config
            folder = str(Path(config.trainer.default_root_dir or os.getcwd()) / "checkpoints")
            for group in ("checkpoint", "last_checkpoint"):
                if config[group].dirpath is None:
                    config[group].dirpath = folder

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            # last.ckpt is written last, so it holds every other callback's state as of the same moment (the
            # best checkpoint's score included, when both save at one validation's end).
            last = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
            others = [cb for cb in trainer.callbacks if not isinstance(cb, LastCheckpoint)]
            trainer.callbacks[:] = [ExactResume(), FiniteLoss(), *others, *last]
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # DeepSpeed/FSDP-sharded write their own
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            lines_off_terminal(trainer)
            return trainer

        def before_fit(self) -> None:
            folder = self.trainer.checkpoint_callback.dirpath
            refuse_fresh_over_earlier(folder, self.config.fit.ckpt_path)
            if self.trainer.is_global_zero:
                remove_temporaries(folder, ".ckpt")  # a killed save's; never trusted
            check_output_dir(folder, need_bytes=3 * checkpoint_bytes(self.model) + MARGIN_BYTES)

        def before_test(self) -> None:
            if self.config[self.subcommand].ckpt_path is None:
                rank_zero_warn(
                    "no --ckpt_path: evaluating the model as the config builds it (untrained adapters, "
                    "or init_from's), not a trained checkpoint"
                )

        before_predict = before_test

    with quiet():  # Lightning's known noise, by message; everything else still shows
        return VitaskCLI(
            LightningModule,
            MedMNISTDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            parser_kwargs={"default_env": False, "exit_on_error": False},
            args=args,
            run=run,
        )


def _underscore_option(arg: str) -> str:
    """``--per-class=3`` -> ``--per_class=3``; values and positionals untouched."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def _run_tool(name: str, argv: list[str]) -> None:
    import importlib
    import inspect

    from jsonargparse import CLI

    target, _ = TOOLS[name]
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    # Options are documented with dashes (--per-class); jsonargparse names them after the parameters.
    argv = [_underscore_option(a) for a in argv]
    # Boolean options also work as bare flags (`--force`), as users of argparse tools expect.
    flags = {f"--{n}" for n, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    argv = [
        f"{a}=true" if a in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a
        for i, a in enumerate(argv)
    ]
    CLI(fn, args=argv, prog=f"vitask {name}", as_positional=name in POSITIONAL)


def _user_error(err: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``err``: jsonargparse re-raises errors from class instantiation as its own."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _parser_error(message: str) -> str:
    """jsonargparse's nested, multi-line type errors as one line: the option as typed, the value, the type wanted."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    values = [v.split("\n")[0].rstrip(". ") for v in re.split(r"(?:Got|Given) value: ", message)[1:]]
    got = [v for v in values if not v.startswith(("Namespace(", "NestedArg("))]
    wanted = re.search(r"Expected a <class '([\w.]+)'>", message)
    if not keys or not got:
        return " ".join(message.split()) + " (`vitask <command> --help` lists the options)"
    option = "--" + ".".join(k for k in keys if k != "init_args")
    kind = (
        f"an {wanted.group(1)}"
        if wanted and wanted.group(1)[0] in "aeiou"
        else f"a {wanted.group(1) if wanted else 'valid value'}"
    )
    return f"{option}: {got[-1].strip()!r} is not {kind}; pass {kind} (`vitask <command> --help` lists the options)."


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    tools = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in TOOLS.items())
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(HELP.format(tools=tools))
            return
        two = " ".join(argv[:2])
        if two in TOOLS:
            _run_tool(two, argv[2:])
        elif argv[0] in TOOLS:
            _run_tool(argv[0], argv[1:])
        elif argv[0] in TRAINER_COMMANDS:
            build_cli(None if from_command_line else argv)  # LightningCLI warns when given both
        else:
            groups = sorted({n.split()[0] for n in TOOLS} | set(TRAINER_COMMANDS))
            print(
                f"vitask: unknown command {' '.join(argv[:2])!r}; choose one of {', '.join(groups)} "
                f"(`vitask --help` lists them all).",
                file=sys.stderr,
            )
            sys.exit(2)
    except ArgumentError as err:  # the trainer commands' parser raises instead of printing its usage
        user_error = _user_error(err)
        if os.environ.get("VITASK_DEBUG"):
            raise
        print(f"error: {user_error or _parser_error(str(err))}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("VITASK_DEBUG"):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
