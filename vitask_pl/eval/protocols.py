"""Two ways to read a class off a generative VLM (docs/method.md#evaluation).

``score``: the log-likelihood of every candidate response under the prompt, softmaxed over the candidates,
gives class probabilities, hence ACC, macro-F1 and AUC. The image and instruction are encoded once per
sample (one prefix pass with a KV cache); a sample's candidates run as one packed row against that cache.
``generate``: greedy decoding with a small token budget, then normalised exact match; unmatched = invalid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitask_pl.data.catalog import DatasetSpec, joint_width
from vitask_pl.eval.parsing import parse_answer
from vitask_pl.models.vlm import VLM

PROTOCOLS = ("score", "generate")


@dataclass
class Prefix:
    """The encoded prompt of a batch: hidden states of its last real token and the cache behind them."""

    last_hidden: torch.Tensor  # (B, D)
    cache: object
    mask: torch.Tensor  # (B, Lp) 1 on real prompt tokens
    next_position: torch.Tensor  # (B,) position id of the first generated token


def _text_positions(vlm: VLM, pos: torch.Tensor) -> torch.Tensor:
    """The ``(B, L)`` positions of new text tokens as the family takes them: Qwen2-VL's M-RoPE on all 3 axes."""
    return pos[None].expand(3, -1, -1) if vlm.family.name == "qwen2_vl" else pos


@torch.no_grad()
def encode_prefix(vlm: VLM, batch: dict, exemplars: torch.Tensor | None = None) -> Prefix:
    """Run the prompt part of each row (image, optional exemplar slots, instruction, assistant header) once.

    ``batch`` is a :class:`~vitask_pl.data.chat.ChatBatch` batch; with ``exemplars`` (flat ``(B * K, D)``) it
    must also carry the ``exemplar_mask`` of its slots (see :func:`vitask_pl.models.exemplar.insert_slots`).
    The returned cache is consumed by :func:`candidate_loglik` or :func:`greedy_generate`: encode once per use.
    """
    length = int(batch["prompt_len"].max())
    ids = batch["input_ids"][:, :length]
    mask = (torch.arange(length, device=ids.device)[None] < batch["prompt_len"][:, None]).long()
    slots = batch["exemplar_mask"][:, :length] if exemplars is not None else None
    embeds = vlm.embed(ids, vlm.image_features(batch["pixel"]), slots, exemplars)
    types = batch["mm_token_type_ids"][:, :length] if "mm_token_type_ids" in batch else None
    positions = vlm.positions(ids, mask, types, batch["pixel"].get("image_grid_thw"))
    hidden, cache = vlm.decode(embeds, mask, positions, use_cache=True)
    last = batch["prompt_len"] - 1
    rows = torch.arange(len(last), device=ids.device)
    pos = positions.max(dim=0).values if positions.ndim == 3 else positions  # M-RoPE: text resumes after the max
    next_position = pos.masked_fill(mask == 0, -1).max(dim=1).values + 1
    return Prefix(hidden[rows, last], cache, mask, next_position)


@torch.no_grad()
def candidate_loglik(vlm: VLM, prefix: Prefix, cand_ids: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` summed log-probabilities of each candidate's tokens (response + end of turn) after the prompt.

    The candidates of a sample run as one packed row against the prompt's cache, which is never copied: each
    candidate's tokens attend to the prompt and to their own earlier tokens only (a block mask), at the positions
    they would have after the prompt. Only the tokens that predict a later token of their candidate are packed,
    left-aligned, so the padding of the ``(C, T)`` candidate grid costs nothing (the bench's proportional batch:
    a 15 x 10 grid per sample holds at most 31 real tokens). The LM head runs only at the packed tokens.
    """
    b, c, t = cand_ids.shape
    logp_first = F.log_softmax(vlm.head(prefix.last_hidden).float(), dim=-1)  # (B, V)
    total = logp_first.gather(1, cand_ids[:, :, 0])  # (B, C)
    if t == 1:
        return total
    predicts = cand_mask[:, :, 1:].reshape(b, c * (t - 1)).bool()  # token s of a candidate predicts token s + 1
    rows, flat = predicts.nonzero(as_tuple=True)  # flat = candidate * (t - 1) + step, in order within a row
    cand = flat // (t - 1)
    cols = (predicts.cumsum(dim=1) - 1)[rows, flat]  # its slot in the packed row
    width = int(predicts.sum(dim=1).max())
    inputs = torch.zeros(b, width, dtype=cand_ids.dtype, device=cand_ids.device)  # padding slots: masked out
    owner = torch.full_like(inputs, -1)  # the candidate of each slot, -1 on padding
    step = torch.zeros_like(inputs)
    inputs[rows, cols] = cand_ids[:, :, :-1].reshape(b, -1)[rows, flat]
    owner[rows, cols], step[rows, cols] = cand, flat % (t - 1)
    embeds = vlm.model.get_input_embeddings()(inputs)
    mask = _packed_mask(prefix.mask.bool(), owner, step, embeds.dtype)
    hidden, _ = vlm.decode(
        embeds, mask, _text_positions(vlm, prefix.next_position[:, None] + step), cache=prefix.cache, use_cache=True
    )
    targets = cand_ids[:, :, 1:].reshape(b, -1)[rows, flat]
    logp = F.log_softmax(vlm.head(hidden[rows, cols]).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    rest = torch.zeros(b * c, device=logp.device).index_add_(0, rows * c + cand, logp)
    return total + rest.view(b, c)


def _packed_mask(prompt: torch.Tensor, owner: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, Q, Lp + Q)`` additive mask of the packed candidates: a slot sees the prompt's real tokens and the
    slots of its own candidate up to its own step (a float mask, which eager and SDPA attention both add)."""
    own = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0) & (step[:, None, :] <= step[:, :, None])
    visible = torch.cat([prompt[:, None, :].expand(-1, owner.shape[1], -1), own], dim=2)
    return torch.zeros(visible.shape, dtype=dtype, device=owner.device).masked_fill(~visible, torch.finfo(dtype).min)[
        :, None
    ]


@torch.no_grad()
def greedy_generate(vlm: VLM, prefix: Prefix, max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """Greedy decoding from the encoded prompt; each row stops at its first stop token (not returned)."""
    stop = torch.tensor(sorted(stop_ids), device=prefix.mask.device)
    token = vlm.head(prefix.last_hidden).argmax(dim=-1)
    mask, position, cache = prefix.mask, prefix.next_position, prefix.cache
    out, done = [], torch.zeros_like(token, dtype=torch.bool)
    for step in range(max_new_tokens):
        done = done | torch.isin(token, stop)
        out.append(token.masked_fill(done, -1))
        if _all_ranks(bool(done.all())) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        embeds = vlm.model.get_input_embeddings()(token[:, None])
        hidden, cache = vlm.decode(
            embeds,
            mask,
            _text_positions(vlm, position[:, None]),
            cache=cache,
            use_cache=True,
        )
        position = position + 1
        token = vlm.head(hidden[:, -1]).argmax(dim=-1)
    tokens = torch.stack(out, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in tokens]


def _all_ranks(flag: bool) -> bool:
    """``flag`` on every rank: under FSDP/ZeRO-3 each decoding step gathers weights, so ranks stop together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor(float(flag), device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def score_to_probs(
    loglik: torch.Tensor, valid: torch.Tensor, dataset: torch.Tensor, specs: Sequence[DatasetSpec]
) -> torch.Tensor:
    """``(B, C)`` candidate log-likelihoods -> ``(B, K)`` joint-space probabilities (softmax over candidates).

    Multi-label ChestMNIST: candidates are the 14 findings and ``no finding``; a finding's probability is its
    candidate's share, which ranks findings for AUC (single-finding answers: see docs/method.md#chestmnist).
    """
    probs = F.softmax(loglik.float().masked_fill(~valid, float("-inf")), dim=1)
    out = torch.zeros(len(dataset), joint_width(specs), device=probs.device)
    for row, d in enumerate(dataset.tolist()):
        spec = specs[d]
        out[row, spec.offset : spec.offset + spec.num_classes] = probs[row, : spec.num_classes]
    return out


def generation_to_probs(
    texts: Sequence[str], dataset: torch.Tensor, specs: Sequence[DatasetSpec]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parsed answers -> ``(B, K)`` one-hot joint-space predictions and ``(B,)`` invalid flags."""
    out = torch.zeros(len(texts), joint_width(specs))
    invalid = torch.zeros(len(texts), dtype=torch.bool)
    for row, (text, d) in enumerate(zip(texts, dataset.tolist())):
        spec = specs[d]
        pred = parse_answer(text, spec)
        if pred is None:
            invalid[row] = True
        else:
            out[row, spec.offset : spec.offset + spec.num_classes] = pred
    return out, invalid
