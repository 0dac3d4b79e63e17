"""vitask_pl.fingerprint's pure parts: a checkpoint's record is described, read and compared in one line each."""

import pytest
import torch

from vitask_pl.errors import ConfigError, MissingFileError
from vitask_pl.fingerprint import KEY, compare, describe, load, read

TSM = {"stage": "TSMModule", "datasets": ["dermamnist", "chestmnist"], "image_size": 28, "tsm_width": 512}
TSM |= {"backbone": "resnet18", "module": "vitask_pl.modules.tsm.TSMModule"}
EP = {
    "stage": "ExemplarPromptTuning",
    "datasets": ["dermamnist", "chestmnist"],
    "image_size": 28,
    "family": "internvl",
    "hidden_size": 64,
    "lora_r": 8,
    "vlm": "tiny:internvl",
    "tsm_width": 512,
}


def title(stage: str) -> str:
    """How messages name a stage (the names themselves belong to the stage registry, not to this test)."""
    return describe({"stage": stage, "datasets": None}).removesuffix(", datasets None")


def test_describe_lists_the_stage_then_the_fields_in_order_then_the_datasets():
    assert title("TSMModule") not in ("", "TSMModule")  # a known stage is named for people, not by its class
    assert describe(TSM) == (
        f"{title('TSMModule')}, tsm_width 512, backbone resnet18, image_size 28, datasets ['dermamnist', 'chestmnist']"
    )
    assert describe(EP) == (
        f"{title('ExemplarPromptTuning')}, family internvl, hidden_size 64, lora_r 8, tsm_width 512, image_size 28, "
        "datasets ['dermamnist', 'chestmnist']"
    )


def test_describe_of_unknown_and_partial_records():
    assert describe({"stage": "MyModule", "lora_r": None, "datasets": ["a"]}) == "MyModule, datasets ['a']"
    assert describe({}) == "None, datasets None"


def test_compare_accepts_the_same_configuration_and_a_partial_record():
    compare(EP, dict(EP), path="x.ckpt", option="--ckpt_path")
    compare({"stage": "TSMModule", "datasets": TSM["datasets"]}, TSM, path="x.ckpt", option="--ckpt_path")
    compare(TSM, {"stage": "TSMModule", "datasets": TSM["datasets"]}, path="x.ckpt", option="--ckpt_path")


def test_compare_names_every_clash_and_both_sides_in_one_line():
    ours = EP | {"family": "qwen2_vl", "hidden_size": 128}
    with pytest.raises(ConfigError) as info:
        compare(EP, ours, path="stage1.ckpt", option="--model.init_args.init_from")
    assert str(info.value) == (
        f"--model.init_args.init_from: stage1.ckpt differs in family, hidden_size: it holds {describe(EP)}; "
        f"this run builds {describe(ours)}. Pass a checkpoint trained with this configuration."
    )
    assert "\n" not in str(info.value)


def test_compare_stage_clash_comes_first_and_stages_widen_what_is_allowed():
    ours = EP | {"stage": "RDACRTTuning", "lora_r": 16}
    with pytest.raises(ConfigError) as info:
        compare(EP, ours, path="a.ckpt", option="--ckpt_path")
    assert str(info.value).startswith(f"--ckpt_path: a.ckpt differs in stage, lora_r: it holds {describe(EP)}; ")
    with pytest.raises(ConfigError, match=r"differs in lora_r: "):
        compare(EP, ours, path="a.ckpt", option="--ckpt_path", stages=("ExemplarPromptTuning", "RDACRTTuning"))
    compare(EP, ours | {"lora_r": 8}, path="a.ckpt", option="--ckpt_path", stages=("ExemplarPromptTuning",))


def test_a_stage_may_train_on_a_subset_of_the_checkpoints_datasets():
    ours = EP | {"stage": "RDACRTTuning", "datasets": ["chestmnist"]}
    compare(EP, ours, path="a.ckpt", option="--init_from", stages=("ExemplarPromptTuning",))
    more = ours | {"datasets": ["chestmnist", "bloodmnist"]}
    with pytest.raises(ConfigError, match=r"^--init_from: a.ckpt differs in datasets: .*datasets \['chestmnist', 'b"):
        compare(EP, more, path="a.ckpt", option="--init_from", stages=("ExemplarPromptTuning",))
    with pytest.raises(ConfigError, match="differs in datasets"):  # no datasets recorded: none is known to be in it
        compare(
            {"stage": "ExemplarPromptTuning"},
            ours,
            path="a.ckpt",
            option="--init_from",
            stages=("ExemplarPromptTuning",),
        )


@pytest.mark.parametrize("run", ["same_datasets", "tsm"])
def test_positions_baked_in_need_the_same_list_in_order(run):
    theirs = TSM if run == "tsm" else EP
    swapped = theirs | {"datasets": theirs["datasets"][::-1]}
    subset = theirs | {"datasets": theirs["datasets"][:1]}
    for ours in (swapped, subset):
        with pytest.raises(ConfigError, match="differs in datasets:"):
            compare(theirs, ours, path="a.ckpt", option="--ckpt_path", same_datasets=run == "same_datasets")
    compare(theirs, dict(theirs), path="a.ckpt", option="--ckpt_path", same_datasets=True)


def test_read_returns_the_record_or_says_what_the_file_is_not():
    record = {"stage": "TSMModule"}
    assert read({KEY: record, "state_dict": {}}, "a.ckpt", "--ckpt_path") is record
    for checkpoint in ({"state_dict": {}}, {KEY: "TSMModule"}):
        with pytest.raises(ConfigError) as info:
            read(checkpoint, "a.ckpt", "--model.init_args.tsm_ckpt")
        assert str(info.value) == (
            "--model.init_args.tsm_ckpt: a.ckpt is not a vitask checkpoint (it has no 'vitask' record); pass a "
            "checkpoint written by `vitask fit`."
        )


def test_load_reads_tensors_to_cpu_and_maps_on_request(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({KEY: {"stage": "TSMModule"}, "w": torch.arange(3.0)}, path)
    for mmap in (False, True):
        checkpoint = load(path, "--ckpt_path", mmap=mmap)
        assert checkpoint[KEY] == {"stage": "TSMModule"} and checkpoint["w"].tolist() == [0.0, 1.0, 2.0]
        assert checkpoint["w"].device == torch.device("cpu")


@pytest.mark.parametrize("missing", ["file", "folder"])
def test_load_of_a_missing_file_names_what_produces_it(missing, tmp_path):
    path = tmp_path / "tsm.ckpt"
    if missing == "folder":
        path.mkdir()
    with pytest.raises(MissingFileError) as info:
        load(path, "--model.init_args.tsm_ckpt", "`vitask fit --config configs/tsm.yaml`")
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value) == (
        f"--model.init_args.tsm_ckpt: {path} not found; produce it with `vitask fit --config configs/tsm.yaml`."
    )


def pickled_object(path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"p": Payload()}, path)


def truncated(path):
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: p.write_bytes(b""), "EOFError"),  # an exception without a message: its type
        (truncated, "PytorchStreamReader failed reading zip archive"),
        (pickled_object, "Weights only load failed"),
    ],
    ids=["empty", "truncated", "pickled-object"],
)
def test_load_of_a_bad_file_is_one_line(write, reason, tmp_path, capsys):
    path = tmp_path / "bad.ckpt"
    write(path)
    with pytest.raises(ConfigError) as info:
        load(path, "--ckpt_path")
    message, head, tail = str(info.value), f"--ckpt_path: {path} cannot be read as a checkpoint (", ")"
    tail += "; pass a checkpoint written by `vitask fit`."
    assert message.startswith(head) and message.endswith(tail) and "\n" not in message
    assert message[len(head) : -len(tail)].startswith(reason) and len(message) - len(head) - len(tail) <= 160
    assert info.value.__cause__ is not None
    assert "pwned" not in capsys.readouterr().out  # refused, never executed
