"""The model every VLM stage trains: the LoRA'd VLM, plus the TSM connector and exemplar source for VITask.

No Lightning here. Vanilla instruction tuning is the same object without an exemplar source. Every stage
checkpoint therefore reads ``model.vlm.*`` and ``model.connector.*``, and :func:`is_adapter` is the one place
that says which of those keys train.
"""

from __future__ import annotations

import torch
from torch import nn

from vitask_pl.data.collate import IGNORE
from vitask_pl.models.exemplar import TSMConnector, insert_slots
from vitask_pl.models.vlm import VLM, gather_response

ADAPTER_PREFIX = "model.connector."  # the TSM connector (not Idefics3's own `connector`, part of the frozen base)


def is_adapter(key: str) -> bool:
    """A state-dict key of a trained part: LoRA weights and the VITask TSM connector."""
    return "lora_" in key or key.startswith(ADAPTER_PREFIX)


class VITaskModel(nn.Module):
    """The LoRA'd VLM and, for the VITask stages, the exemplar source (frozen TSM) and its connector.

    Args:
        vlm: the VLM with LoRA on its language model.
        source: the frozen TSM and its feature tables (:class:`~vitask_pl.modules.exemplar_source.ExemplarSource`);
            ``None`` for vanilla instruction tuning.
        exemplar_tokens: exemplar tokens per pooled feature.
    """

    def __init__(self, vlm: VLM, source: nn.Module | None = None, exemplar_tokens: int = 1):
        super().__init__()
        self.vlm, self.source = vlm, source
        self.connector = TSMConnector(source.width, vlm.hidden_size, exemplar_tokens) if source is not None else None

    def exemplars(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, K, D)`` exemplar embeddings from ``(B, F)`` (or ``(B, T, F)``) TSM features."""
        dtype = self.vlm.model.get_input_embeddings().weight.dtype
        return self.connector(features.to(self.connector.net[1].weight.dtype)).to(dtype)

    def num_slots(self, features: torch.Tensor) -> int:
        """Exemplar tokens per sample: the connector's for a pooled feature, one per patch otherwise."""
        return self.connector.num_tokens if features.ndim == 2 else features.shape[1]

    def response_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        image_features: torch.Tensor,
        *,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        exemplar_mask: torch.Tensor | None = None,
        exemplars: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits at response positions only: ``(N, V)`` logits, ``(N,)`` targets, ``(N,)`` rows.

        The LM head never sees the image or instruction positions (vocabularies are 32k-150k wide).
        """
        vlm = self.vlm
        embeds = vlm.embed(input_ids, image_features, exemplar_mask, exemplars)
        positions = vlm.positions(input_ids, attention_mask, mm_token_type_ids, image_grid_thw)
        hidden, _ = vlm.decode(embeds, attention_mask, positions)
        rows, targets, row_ids = gather_response(hidden, labels)
        return vlm.head(rows), targets, row_ids

    def plain(self, batch: dict, pixel: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The VLM alone on a batch (with ``pixel``'s images instead of its own, for Fig. 3's negatives):
        ``(N, V)`` response logits, ``(N,)`` targets and ``(N,)`` the batch row of each (vanilla's ``L_van``)."""
        pixel = batch["pixel"] if pixel is None else pixel
        extra = _extra(batch, pixel)
        return self.response_logits(*_text(batch), self.vlm.image_features(pixel), **extra)

    def ep(self, batch: dict, features: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The EP view alone (exemplar slots after the image): response logits, targets and rows, as :meth:`plain`.

        :meth:`fused_views` computes the same rows inside one fused batch; this is the separate forward.
        """
        exemplars = self.exemplars(features)
        view = insert_slots(batch, exemplars.shape[1], self.vlm.image_token_id, pad_id)
        return self.response_logits(
            *_text(view),
            self.vlm.image_features(batch["pixel"]),
            exemplar_mask=view["exemplar_mask"],
            exemplars=exemplars.flatten(0, 1),
            **_extra(view, batch["pixel"]),
        )

    def fused_views(
        self, batch: dict, features: torch.Tensor, pad_id: int, *, negatives: bool, prefix_sharing: bool = True
    ) -> dict:
        """The EP, plain and (with ``negatives``) negative views of a batch through the decoder as ONE batch.

        The frozen vision features of image_i are computed once and shared by its EP and plain rows; the negative
        rows reuse the plain rows' text with image_j's features. Logits are taken at response positions only;
        all views hold the same response tokens, so the rows align across views.

        With ``prefix_sharing`` the EP and plain views' common prefix (every token up to the last image token,
        where the exemplar slots begin) goes through the decoder once, and both suffixes attend to its keys and
        values, which carry gradients. Under causal attention that prefix's hidden states are the same in both
        views, so this is exact (docs/method.md#views); the plain path computes it twice.

        Args:
            batch: a :class:`~vitask_pl.data.chat.ChatBatch` batch (with ``neg_pixel`` for negatives).
            features: ``(B, F)`` (or ``(B, T, F)``) TSM features of the batch's images.
            pad_id: the id the exemplar slots hold (their embeddings are replaced).
            negatives: add the negative view (CRT).
            prefix_sharing: compute the shared prefix once (``False``: every view whole, the reference path).

        Returns: ``{"ep", "plain", "neg"}`` logits ``(N, V)`` (``neg`` only with negatives) and ``targets``.
        """
        exemplars = self.exemplars(features)
        ep = insert_slots(batch, exemplars.shape[1], self.vlm.image_token_id, pad_id)
        length = ep["input_ids"].shape[1]

        def padded(x: torch.Tensor, fill) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=fill)

        n_views = 3 if negatives else 2
        plain = {
            "input_ids": padded(batch["input_ids"], pad_id),
            "attention_mask": padded(batch["attention_mask"], 0),
            "labels": padded(batch["labels"], IGNORE),
        }
        ids, mask, labels = (torch.cat([ep[k]] + [plain[k]] * (n_views - 1)) for k in plain)
        slots = torch.cat([ep["exemplar_mask"]] + [torch.zeros_like(ep["exemplar_mask"])] * (n_views - 1))
        image_i = self.vlm.image_features(batch["pixel"])
        images = [image_i] + ([self.vlm.image_features(batch["neg_pixel"])] if negatives else [])
        extra = {}
        if "mm_token_type_ids" in batch:  # Qwen2-VL's M-RoPE reads the token types and the image grids
            types = padded(batch["mm_token_type_ids"], 0)
            extra["mm_token_type_ids"] = torch.cat([ep["mm_token_type_ids"]] + [types] * (n_views - 1))
            pixels = [batch["pixel"]] * 2 + ([batch["neg_pixel"]] if negatives else [])
            extra["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in pixels])
        flat = exemplars.reshape(-1, exemplars.shape[-1])
        if prefix_sharing:
            hidden = self._shared_prefix_decode(ids, mask, images, slots, flat, n_views, **extra)
            cut = labels.shape[1] - hidden.shape[1]  # the prefix's last position predicts the label at `cut`
            if bool((labels[:, cut] != IGNORE).any()):
                raise ValueError("prefix sharing: a response starts right after the image; there is no prefix.")
            rows, targets, _ = gather_response(hidden, labels[:, cut:])
            logits = self.vlm.head(rows)
        else:  # EP and plain rows both read image_i
            features_all = torch.cat([image_i, *images])
            logits, targets, _ = self.response_logits(
                ids, mask, labels, features_all, exemplar_mask=slots, exemplars=flat, **extra
            )
        logits = logits.chunk(n_views)
        out = {"ep": logits[0], "plain": logits[1], "targets": targets.chunk(n_views)[0]}
        if negatives:
            out["neg"] = logits[2]
        return out

    def _shared_prefix_decode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        images: list[torch.Tensor],
        slots: torch.Tensor,
        exemplars: torch.Tensor,
        n_views: int,
        *,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder hidden states of the stacked views ``[EP; plain; (neg)]`` after their common prefix.

        The prefix (every token before the first exemplar slot) is the same in the EP and plain rows of a
        sample, so it runs once per *image*: ``[plain prefix with image_i; (neg prefix with image_j)]``. Its
        cache is then repeated to the stacked rows and the suffixes run against it. Returns ``(rows, L - P)``.
        """
        vlm, b = self.vlm, ids.shape[0] // n_views
        starts = slots[:b].float().argmax(dim=1)  # the first slot of each EP row: just past its last image token
        p = int(starts[0])
        if not bool((starts == p).all()) or not bool(mask[:, :p].all()):
            raise ValueError(
                "prefix sharing: the rows' prompts differ before the image ends (the chat template puts text of "
                "varying length before the image); use --model.init_args.vlm_options.prefix_sharing false."
            )
        positions = vlm.positions(ids, mask, mm_token_type_ids, image_grid_thw)  # of the whole views, then split
        prefix_rows = torch.arange(b, ids.shape[0], device=ids.device)  # plain (and neg) rows; EP's prefix = plain's
        prefix_pos = positions[..., prefix_rows, :p]  # (B', p), or Qwen2-VL's (3, B', p)
        embeds = vlm.embed(ids[prefix_rows, :p], torch.cat(images))
        _, cache = vlm.decode(embeds, mask[prefix_rows, :p], prefix_pos, use_cache=True)
        # cache rows -> stacked rows: EP and plain both read the plain prefix; neg its own
        rows = torch.cat([torch.arange(b), torch.arange(b), *([torch.arange(b, 2 * b)] if n_views == 3 else [])])
        cache.reorder_cache(rows.to(ids.device))
        no_images = images[0][:0]  # the suffix holds no image token
        embeds = vlm.embed(ids[:, p:], no_images, slots[:, p:], exemplars)
        hidden, _ = vlm.decode(embeds, mask, positions[..., p:], cache=cache, use_cache=True)
        return hidden


def _text(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def _extra(batch: dict, pixel: dict) -> dict:
    """The family-specific inputs of a batch: Qwen2-VL's token types and image grids for M-RoPE."""
    if "mm_token_type_ids" not in batch:
        return {}
    return {"mm_token_type_ids": batch["mm_token_type_ids"], "image_grid_thw": pixel["image_grid_thw"]}
