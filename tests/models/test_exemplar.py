import torch

from vitask_pl.data.collate import IGNORE
from vitask_pl.models.exemplar import TSMConnector, insert_slots


def toy_batch():
    # two rows, image token 9, right padding with 0; row 1 is shorter
    ids = torch.tensor([[5, 9, 9, 6, 7, 8, 2], [5, 9, 9, 6, 8, 2, 0]])
    mask = (torch.arange(7)[None] < torch.tensor([[7], [6]])).long()
    labels = torch.full_like(ids, IGNORE)
    labels[0, 5:7], labels[1, 4:6] = ids[0, 5:7], ids[1, 4:6]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_len": torch.tensor([5, 4]),
        "mm_token_type_ids": (ids == 9).long(),
    }


def test_insert_slots_puts_k_slots_right_after_the_image_tokens():
    batch = toy_batch()
    view = insert_slots(batch, 2, image_token_id=9, fill_id=0)
    assert view["input_ids"].tolist() == [[5, 9, 9, 0, 0, 6, 7, 8, 2], [5, 9, 9, 0, 0, 6, 8, 2, 0]]
    assert view["exemplar_mask"].int().tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 0]] * 2
    assert view["attention_mask"].tolist() == [[1] * 9, [1] * 8 + [0]]
    assert view["prompt_len"].tolist() == [7, 6]
    assert view["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0]] * 2
    # the response moved with the text: same tokens, shifted by 2, and nothing else carries loss
    for row, (start, end) in enumerate([(5, 7), (4, 6)]):
        assert view["labels"][row, start + 2 : end + 2].tolist() == batch["labels"][row, start:end].tolist()
        assert int((view["labels"][row] != IGNORE).sum()) == end - start
    assert torch.equal(batch["input_ids"], toy_batch()["input_ids"])  # the plain view is untouched


def test_connector_shapes_and_architecture():
    pooled = TSMConnector(12, 8, num_tokens=3)
    assert pooled(torch.randn(5, 12)).shape == (5, 3, 8)
    assert [type(m).__name__ for m in pooled.net] == ["LayerNorm", "Linear", "GELU", "Linear"]
    patch = TSMConnector(12, 8)
    assert patch(torch.randn(5, 4, 12)).shape == (5, 4, 8)
