"""The strategy presets (configs/strategy/*.yaml) on top of a stage config: they parse, and the trainers they
describe construct on CPU where Lightning allows it (DeepSpeed does; FSDP refuses a CPU accelerator)."""

import shlex
from pathlib import Path

import pytest
import torch
import yaml

from vitask_pl.cli import build_cli

from .conftest import ROOT, run, stage_configs

STRATEGIES = sorted((ROOT / "configs/strategy").glob("*.yaml"))
STAGE2 = stage_configs("rda_crt")
FLAGS = ["dermamnist", "chestmnist"]


def overlay(name: str) -> list[str]:
    return ["--config", str(ROOT / "configs/strategy" / f"{name}.yaml")]


def test_every_preset_is_tested():
    assert {p.stem for p in STRATEGIES} == {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "bf16"}


@pytest.mark.parametrize("preset", STRATEGIES, ids=lambda p: p.stem)
def test_preset_parses_on_top_of_stage2(preset, capsys, synth_root):
    argv = ["fit", *STAGE2, "--config", str(preset), "--data.root", str(synth_root), "--data.datasets", "[dermamnist]"]
    code, out, err = run([*argv, "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out[out.index("# lightning.pytorch") :])  # deepspeed's import logs to stdout first
    wanted = yaml.safe_load(preset.read_text())["trainer"]
    for key, value in wanted.items():
        if key == "strategy":
            assert printed["trainer"]["strategy"]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= printed["trainer"]["strategy"]["init_args"].items()
        else:
            assert printed["trainer"][key] == value


def usage_line(preset: Path) -> list[str]:
    """The `vitask fit ...` example in the preset's header comment (with its `\\` continuations), as argv."""
    words, going = [], False
    for line in preset.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if going or text.startswith("vitask fit "):
            words += shlex.split(text.removesuffix("\\"))
            going = text.endswith("\\")
            if not going:
                break
    return [w.strip("[]") for w in words[1:]]  # `[--trainer.devices 4]`: an optional part, taken


@pytest.mark.parametrize("preset", STRATEGIES, ids=lambda p: p.stem)
def test_the_usage_line_in_each_preset_parses_as_written(preset, capsys):
    """Each preset documents how to use it; that command must still parse and give what it says it sets."""
    argv = usage_line(preset)
    assert argv[0] == "fit" and f"configs/strategy/{preset.name}" in argv  # the example uses the preset itself
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
    code, out, err = run([*argv, "--print_config"], capsys)
    assert code == 0, err
    printed = yaml.safe_load(out[out.index("# lightning.pytorch") :])
    options = [(k, v) for k, v in zip(argv[1::2], argv[2::2], strict=True) if k != "--config"]
    assert options  # every example names the checkpoints it needs, at least
    for option, value in options:
        node = printed
        for key in option.removeprefix("--").split("."):
            node = node[key]
        assert str(node) == value, option


def test_fsdp_preset_wraps_each_decoder_layer():
    """The YAML names the layer class; jsonargparse must turn it into FSDP's ModuleWrapPolicy, not a string."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    preset = yaml.safe_load((ROOT / "configs/strategy/fsdp.yaml").read_text())
    strategy = parser.instantiate(parser.parse_object({"strategy": preset["trainer"]["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Qwen2DecoderLayer}
    assert strategy.kwargs["use_orig_params"] is True
    assert (
        preset["model"]["init_args"]["vlm_options"]["dtype"] == "float32"
    )  # one dtype per FSDP unit: base and LoRA alike


@pytest.fixture(scope="module")
def stage1_adapters(tsm_ckpt, tmp_path_factory):
    """A stage-1 adapter file with the offline overlay's LoRA shape (untrained: only construction is tested)."""
    from vitask_pl.fingerprint import stamp
    from vitask_pl.models.vitask_model import is_adapter
    from vitask_pl.models.vlm import LoraSettings
    from vitask_pl.modules.vitask import ExemplarPromptTuning

    lora = LoraSettings(r=8, alpha=16, dropout=0.0)  # configs/offline/vlm.yaml
    module = ExemplarPromptTuning(
        tsm_ckpt=tsm_ckpt, vlm="tiny:internvl", datasets=FLAGS, lora=lora, exemplar={"feature_cache": False}
    )
    path = tmp_path_factory.mktemp("stage1") / "stage1.ckpt"
    checkpoint = {"state_dict": {k: v for k, v in module.state_dict().items() if is_adapter(k)}}
    stamp(checkpoint, module)  # what on_save_checkpoint adds
    torch.save(checkpoint, path)
    return str(path)


def build(name: str, tsm_ckpt: str, init_from: str, root: Path, out: Path):
    return build_cli(
        [
            *STAGE2,
            *overlay(name),
            "--data.root",
            str(root),
            "--data.datasets",
            f"[{','.join(FLAGS)}]",
            "--data.num_workers",
            "0",
            "--model.init_args.tsm_ckpt",
            tsm_ckpt,
            "--model.init_args.init_from",
            init_from,
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(out),
        ],
        run=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trainer_constructs_on_cpu(stage, tsm_ckpt, stage1_adapters, synth_root, tmp_path):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from vitask_pl.fingerprint import stamp

    cli = build(f"deepspeed_zero{stage}", tsm_ckpt, stage1_adapters, synth_root, tmp_path)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage and strategy.exclude_frozen_parameters
    assert cli.model.strict_loading is False  # DeepSpeed loads the adapters-only module state non-strictly
    # DeepSpeed restores weights itself and hands on_load_checkpoint its client state, which has no state_dict
    # but keeps the configuration record.
    client_state = {"epoch": 0, "global_step": 4}
    stamp(client_state, cli.model)
    cli.model.on_load_checkpoint(client_state)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ddp_and_bf16_trainers_construct_on_cpu(tsm_ckpt, stage1_adapters, synth_root, tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cli = build("ddp", tsm_ckpt, stage1_adapters, synth_root, tmp_path)
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.strategy._ddp_kwargs["find_unused_parameters"] is False
    cli = build("bf16", tsm_ckpt, stage1_adapters, synth_root, tmp_path)
    assert cli.trainer.precision == "bf16-mixed"


@pytest.mark.gpu
@pytest.mark.slow
def test_stage2_step_bf16_mixed_on_cuda(tsm_ckpt, stage1_adapters, synth_root, tmp_path):
    import lightning as L

    from vitask_pl.data.datamodule import MedMNISTDataModule
    from vitask_pl.models.vlm import LoraSettings
    from vitask_pl.modules.vitask import RDACRTTuning

    module = RDACRTTuning(
        init_from=stage1_adapters,
        tsm_ckpt=tsm_ckpt,
        vlm="tiny:internvl",
        datasets=FLAGS,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        exemplar={"cache_dir": str(tmp_path / "features")},
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    dm = MedMNISTDataModule(synth_root, FLAGS, 28, batch_size=4, num_workers=0, max_samples=8)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = dict(module.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach().cpu()) for n in before)
    assert all(not p.requires_grad for p in module.model.connector.parameters())
