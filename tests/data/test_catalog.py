import pytest

from vitask_pl.data.catalog import FLAGS, check_size, dataset_specs, joint_width, resolve_flags
from vitask_pl.data.prompts import NO_FINDING, candidate_responses, instruction, response
from vitask_pl.errors import ConfigError


def test_all_twelve_give_the_paper_70_way_head_with_shared_organ_block():
    specs = dataset_specs(resolve_flags("all"))
    assert len(specs) == 12 and joint_width(specs) == 70
    organ = {s.flag: s.offset for s in specs if s.flag.startswith("organ")}
    assert len(set(organ.values())) == 1
    # every other dataset has a block of its own that does not overlap any other
    blocks = sorted({(s.offset, s.offset + s.num_classes) for s in specs})
    assert all(a[1] <= b[0] for a, b in zip(blocks, blocks[1:]))


def test_subset_head_is_compact():
    specs = dataset_specs(["dermamnist", "organcmnist", "organsmnist"])
    assert [s.offset for s in specs] == [0, 7, 7] and joint_width(specs) == 18


def test_resolve_flags_rejects_unknown_with_suggestion():
    with pytest.raises(ConfigError, match=r"--data.datasets: unknown dataset 'dermamnst'.*did you mean 'dermamnist'"):
        resolve_flags(["dermamnst"])
    assert resolve_flags("all") == list(FLAGS)
    assert resolve_flags(["chestmnist", "chestmnist"]) == ["chestmnist"]


def test_unsupported_size():
    with pytest.raises(ConfigError, match=r"--data.size: unsupported image size 32; MedMNIST ships 28, 64, 128, 224"):
        check_size(32)


def test_prompts_full_incomplete_and_chest_response():
    derma, chest = dataset_specs(["dermamnist", "chestmnist"])
    full = instruction(derma)
    assert full.startswith("Analyze the given dermatoscope image. The possible diagnoses are: actinic keratoses")
    assert full.endswith("vascular lesions.")
    assert instruction(derma, incomplete=True) == "Analyze the given dermatoscope image."
    assert response(derma, [4]) == "melanoma"
    label = [0] * 14
    assert response(chest, label) == NO_FINDING
    label[1] = label[2] = 1
    assert response(chest, label) == "cardiomegaly, effusion"
    assert candidate_responses(chest)[-1] == NO_FINDING and len(candidate_responses(chest)) == 15
