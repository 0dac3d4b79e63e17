"""From VITask samples to VLM tokens, in DataLoader workers (docs/method.md#masking).

The model's own chat template renders the instruction (user turn with the image) and the response
(assistant turn); the processor expands the image placeholder. Labels cover the response and the end-of-turn
token only. Nothing is ever truncated: a sample longer than ``max_length`` is an error, because cutting
image tokens or the response would silently train on something else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vitask_pl.data.catalog import DatasetSpec
from vitask_pl.data.collate import IGNORE, joint_targets
from vitask_pl.data.dataset import stack_images
from vitask_pl.data.prompts import candidate_responses
from vitask_pl.errors import ConfigError


def messages(instruction: str, response: str | None = None) -> list[dict]:
    """A one-image user turn, plus the assistant's response when given."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if response is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return turns


def rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 1|3)`` uint8 -> ``(H, W, 3)``: every VLM processor expects RGB."""
    return image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)


class ChatTemplate:
    """Renders and tokenizes VITask conversations with one processor; the processor is the only fact used."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # render() calls the processor's apply_chat_template, which ignores a template the tokenizer alone has.
        if not getattr(processor, "chat_template", None):
            raise ConfigError(
                "--model.init_args.vlm: the processor has no chat template (one in tokenizer_config.json alone is "
                "not used); use a chat/instruct checkpoint or save one with processor.chat_template = ... before "
                "loading it here."
            )
        self.special_ids = set(self.tokenizer.all_special_ids)
        self._continuations: dict[tuple[str, str], tuple[list[int], int]] = {}

    def render(self, instruction: str, response: str | None = None) -> str:
        return self.processor.apply_chat_template(
            messages(instruction, response), tokenize=False, add_generation_prompt=response is None
        )

    def continuation(self, instruction: str, response: str) -> tuple[list[int], int]:
        """``(ids, n)``: the response and end-of-turn token ids that follow the generation prompt, and the
        number ``n`` of tokens the assistant turn adds in all (a template may add a newline after the turn).

        Checked to extend the prompt's own tokenization (the template parity the labels rely on). Cached: a run
        has one pair per dataset, instruction variant and label, and every batch repeats them.
        """
        key = (instruction, response)
        if key not in self._continuations:
            self._continuations[key] = self._continuation(instruction, response)
        return self._continuations[key]

    def _continuation(self, instruction: str, response: str) -> tuple[list[int], int]:
        prompt, full = self.render(instruction), self.render(instruction, response)
        if not full.startswith(prompt):
            raise ConfigError(
                "--model.init_args.vlm: the chat template renders the prompt differently with and without the "
                "assistant turn, so response tokens cannot be located; fix the template's add_generation_prompt."
            )
        p_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f_ids = self.tokenizer(full, add_special_tokens=False)["input_ids"]
        if f_ids[: len(p_ids)] != p_ids:
            raise ConfigError(
                "--model.init_args.vlm: the response tokenization merges into the prompt's last token; "
                "the chat template must end the generation prompt on a token boundary."
            )
        tail = f_ids[len(p_ids) :]
        # The response is plain text; the first special token after it ends the turn (<|im_end|>, </s>, ...).
        end = next((i for i, t in enumerate(tail) if t in self.special_ids), None)
        if end is None:
            raise ConfigError(
                "--model.init_args.vlm: the chat template adds no end-of-turn token after the "
                "assistant's response, so the model could never learn to stop."
            )
        return tail[: end + 1], len(tail)


class ChatBatch:
    """Samples -> one VLM batch (right-padded).

    Keys: ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)`` (and ``mm_token_type_ids`` where the
    processor gives it); ``pixel``: the processor's image tensors; ``neg_pixel`` for negative images when
    samples carry them; ``prompt_len`` ``(B,)`` tokens before the response; ``cand_ids``/``cand_mask``
    ``(B, C, T)`` and ``cand_valid`` ``(B, C)``: every candidate response of the sample's dataset (for scoring);
    ``dataset``, ``index``, ``targets`` as in :class:`~vitask_pl.data.collate.ImageBatch`.
    """

    TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")

    def __init__(
        self,
        processor,
        specs: Sequence[DatasetSpec],
        *,
        max_length: int = 2048,
        processor_kwargs=None,
        with_images: bool = False,
    ):
        self.with_images = with_images  # raw uint8 images too, for a TSM run in the step (no feature cache)
        self.template = ChatTemplate(processor)
        self.processor, self.specs = processor, list(specs)
        self.max_length, self.processor_kwargs = max_length, dict(processor_kwargs or {})
        self.pad_id = self.template.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.template.tokenizer.eos_token_id
        self._candidates: dict[int, list[list[int]]] = {}

    @property
    def tokenizer(self):
        return self.template.tokenizer

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: the template's end-of-turn token and EOS."""
        end_of_turn = self.template.continuation("x", "y")[0][-1]
        return sorted(
            {end_of_turn, *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])}
        )

    def candidates(self, d: int, instruction: str) -> list[list[int]]:
        """Continuation ids of every candidate response of dataset ``d`` (computed once per dataset)."""
        if d not in self._candidates:
            self._candidates[d] = [
                self.template.continuation(instruction, r)[0] for r in candidate_responses(self.specs[d])
            ]
        return self._candidates[d]

    def encode_images(self, texts: list[str], images: list[np.ndarray]) -> dict:
        return self.processor(
            text=texts,
            images=[[rgb(im)] for im in images],
            return_tensors="pt",
            padding=True,
            padding_side="right",  # prompts start at 0, so the response offset is the prompt length
            **self.processor_kwargs,
        )

    def __call__(self, samples: list[dict]) -> dict:
        instructions = [s["instruction"] for s in samples]
        responses = [s["response"] for s in samples]
        texts, enc, labels, prompt_len = self.encode([s["image"] for s in samples], instructions, responses)
        lengths = enc["attention_mask"].sum(dim=1)
        if int(lengths.max()) > self.max_length:
            worst = int(lengths.argmax())
            raise ConfigError(
                f"--model.init_args.vlm_options.max_length: {self.max_length} would cut the image tokens or the response of a "
                f"{self.specs[samples[worst]['dataset']].flag} sample ({int(lengths[worst])} tokens); raise it to at "
                f"least {int(lengths.max())} (samples are never truncated)."
            )
        batch = {k: enc[k] for k in self.TEXT_KEYS if k in enc}
        batch["labels"] = labels
        batch["pixel"] = {k: v for k, v in enc.items() if k not in self.TEXT_KEYS}
        if "negative_image" in samples[0]:
            neg = self.encode_images(texts, [s["negative_image"] for s in samples])
            batch["neg_pixel"] = {k: v for k, v in neg.items() if k not in self.TEXT_KEYS}
        batch["prompt_len"] = prompt_len
        if self.with_images:
            batch["images"] = stack_images([s["image"] for s in samples])
        batch.update(self.candidate_tensors(samples))
        dataset = [s["dataset"] for s in samples]
        batch["dataset"] = torch.tensor(dataset)
        batch["index"] = torch.tensor([s["index"] for s in samples])
        batch["targets"] = joint_targets(self.specs, dataset, [s["label"] for s in samples])
        return batch

    def encode(self, images: list[np.ndarray], instructions: list[str], responses: list[str]):
        """One-image conversations -> ``(texts, processor output, labels (B, L), prompt lengths (B,))``.

        Labels hold the response and end-of-turn ids and ``IGNORE`` elsewhere, checked against the chat
        template's own tokenization (template parity).
        """
        texts, label_ids, tails = [], [], []
        for instruction, response in zip(instructions, responses):
            texts.append(self.template.render(instruction, response))
            ids, tail = self.template.continuation(instruction, response)
            label_ids.append(ids)
            tails.append(tail)
        enc = self.encode_images(texts, images)
        prompt_len = enc["attention_mask"].sum(dim=1) - torch.tensor(tails)
        labels = torch.full_like(enc["input_ids"], IGNORE)
        for row, (start, ids) in enumerate(zip(prompt_len.tolist(), label_ids)):
            if enc["input_ids"][row, start : start + len(ids)].tolist() != ids:
                raise ConfigError(
                    "--model.init_args.vlm: the processor's tokenization of the conversation does not "
                    "match the chat template's (template parity); check the processor's template."
                )
            labels[row, start : start + len(ids)] = torch.tensor(ids)
        return texts, enc, labels, prompt_len

    def candidate_tensors(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        cands = [self.candidates(s["dataset"], s["instruction"]) for s in samples]
        c_max, t_max = max(len(c) for c in cands), max(len(ids) for c in cands for ids in c)
        ids = torch.full((len(samples), c_max, t_max), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(samples), c_max, t_max, dtype=torch.long)
        valid = torch.zeros(len(samples), c_max, dtype=torch.bool)
        for b, cand in enumerate(cands):
            for c, seq in enumerate(cand):
                ids[b, c, : len(seq)], mask[b, c, : len(seq)], valid[b, c] = torch.tensor(seq), 1, True
        return {"cand_ids": ids, "cand_mask": mask, "cand_valid": valid}
