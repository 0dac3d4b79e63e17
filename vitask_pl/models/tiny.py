"""Tiny random-weight VLMs of the real transformers classes, built offline in a few seconds.

Each family gets its real model, processor and chat-template conventions (special tokens, image placeholders,
end-of-turn token), so code written against a tiny model runs unchanged on the real checkpoint; only the sizes
shrink (hidden 64, two layers) and the tokenizer is a byte-level BPE learned on VITask's own prompt texts.

``resolve_tiny("tiny:llava")`` turns such a spec into a cached local directory, building it on first use.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitask_pl.atomic import is_nonempty, overwrite_error, publish_dir, sibling
from vitask_pl.data.catalog import FLAGS, dataset_specs
from vitask_pl.data.generic import corpus_texts
from vitask_pl.data.prompts import candidate_responses, instruction
from vitask_pl.errors import ConfigError, suggest
from vitask_pl.models.families import FAMILY_NAMES, family_of
from vitask_pl.models.generalist import pretrain

TINY_PREFIX = "tiny:"
VERSION = "v3"
# `tiny:<family>` specs get this much text-only warm-up (see _pretrain_text); `vitask tiny-vlm` defaults to none.
GENERALIST_SUFFIX = "-generalist"  # tiny:internvl-generalist
SPEC_PRETRAIN_STEPS = (
    300  # part of the cache directory name: bump it when a build changes, so stale caches are not reused
)

VOCAB = 2048  # upper bound; the BPE stops earlier once every word of the corpus is one token


@dataclass(frozen=True)
class Dims:
    """The sizes of a tiny VLM (its vision tower and language model share width and depth).

    ``grid`` is the number of patches per image side at any resolution (patch = image_size // grid): every image
    size gives the same handful of image tokens (grid**2 for LLaVA, (grid/2)**2 after the 2x2 merge of the
    others), which keeps 224 px runs fast.
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 128
    grid: int = 4
    vision: Dims | None = None  # the vision tower's own sizes (its hidden, layers, heads, mlp); None: the above
    vocab: int = 0  # pad the language model's vocabulary to this many rows (0: the tokenizer's size)


RANDOM = Dims()  # `tiny:<family>`: random weights (plus a text warm-up), for the fast tests
# `tiny:<family>-generalist` (see vitask_pl.models.generalist): wider and deeper, so it learns the generic corpus
# well within its few minutes of pretraining on two cores.
GENERALIST = Dims(hidden=128, layers=3, heads=4, kv_heads=2, mlp=256, grid=4)
GENERALIST_STEPS = 800
GENERALIST_VOCAB = 1024  # small enough that made-up words, and so any new label, split into common pieces
# Bump when the generalist's recipe (sizes, corpus, steps, optimiser) changes: it names the cache folder, so a
# stale build is never reused.
GENERALIST_VERSION = "g2"

# Words the chat templates and generic chat add around the prompts, so they tokenize compactly too.
CHAT_WORDS = (
    "system",
    "user",
    "assistant",
    "System",
    "User",
    "Assistant",
    "SYSTEM",
    "USER",
    "ASSISTANT",
    "You are a helpful assistant.",
    "What is shown in this image? Answer with the diagnosis only.",
    "Yes, no, the image shows a sample of class 0 1 2 3 4 5 6 7 8 9.",
)


# --------------------------------------------------------------------------------------------- chat templates
# Written with ``$NAME`` placeholders (filled by _template) so Jinja's own braces stay readable. Content may be a
# string or a list of {"type": "image"} / {"type": "text"} parts, as in every real family's template. The
# assistant's text and end-of-turn token sit in {% generation %} so return_assistant_tokens_mask works.
_PARTS = (
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
    "else message['content'] -%}"
)

# InternVL and Qwen2-VL: ChatML; the image placeholder is expanded by the processor.
_CHATML = (
    "{%- for message in messages -%}"
    "$SYSTEM"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    + _PARTS
    + "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] -}}{%- endfor -%}{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    "{%- for p in parts -%}{%- if p['type'] == 'image' -%}{{- '$IMAGE' -}}"
    "{%- elif p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_QWEN_SYSTEM = (  # Qwen2-VL's template adds this system turn when the conversation has none
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
)

# LLaVA-1.5: "USER: <image>\n{text} ASSISTANT: {answer}</s>".
_LLAVA = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}" + _PARTS + "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] + ' ' -}}{%- endfor -%}"
    "{%- else -%}"
    "{{- message['role'].upper() + ': ' -}}"
    "{%- for p in parts if p['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] -}}{%- endfor -%}{{- '</s>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] + ' ' -}}{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Idefics3: "User:<image>{text}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n".
_IDEFICS3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    + _PARTS
    + "{{- message['role'] | capitalize -}}{{- ':' if parts[0]['type'] == 'image' else ': ' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- p['text'] -}}{%- endfor -%}{{- '<end_of_utterance>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- for p in parts -%}{%- if p['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}{{- '<end_of_utterance>' -}}"
    "{%- endif -%}{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _template(template: str, **fill: str) -> str:
    for key, value in fill.items():
        template = template.replace(f"${key}", value)
    return template


# ------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class _Recipe:
    """What differs between families: their special tokens, chat template and model/processor construction."""

    tokens: dict[str, str]  # named special tokens: bos/eos/pad plus model-specific names (image_token, ...)
    chat_template: str
    build: Callable  # (tokenizer, image_size, dims) -> (model, processor)
    extra: tuple[str, ...] = ()  # further special tokens the processor looks up by string


def _text_dims(tok, dims: Dims) -> dict:
    """Text-model sizes and token ids shared by all families."""
    return dict(
        vocab_size=max(len(tok), dims.vocab),
        hidden_size=dims.hidden,
        intermediate_size=dims.mlp,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vision_dims(image_size: int, dims: Dims) -> dict:
    tower = dims.vision or dims
    return dict(
        hidden_size=tower.hidden,
        intermediate_size=tower.mlp,
        num_hidden_layers=tower.layers,
        num_attention_heads=tower.heads,
        image_size=image_size,
        patch_size=image_size // dims.grid,
    )


def _build_internvl(tok, image_size: int, dims: Dims):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
    )

    seq = (dims.grid // 2) ** 2  # pixel shuffle with downsample_ratio 0.5 merges 2x2 patches
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**_vision_dims(image_size, dims)),
        text_config={"model_type": "qwen2", **_text_dims(tok, dims)},
        image_token_id=tok.context_image_token_id,
        image_seq_length=seq,
        downsample_ratio=0.5,
    )
    size = {"height": image_size, "width": image_size}
    # crop_to_patches is InternVL's tiling. InternVLProcessor turns it on for every call (its images_kwargs
    # default wins over the image processor's), so max_patches=1 is what keeps one tile per image.
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False, max_patches=1),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=seq,
    )
    return InternVLForConditionalGeneration(config), processor


def _build_llava(tok, image_size: int, dims: Dims):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor

    patch = image_size // dims.grid
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "projection_dim": dims.hidden,
            **_vision_dims(image_size, dims),
        },
        text_config={"model_type": "llama", **_text_dims(tok, dims)},
        image_token_index=tok.image_token_id,
        image_seq_length=dims.grid**2,
        vision_feature_select_strategy="default",
    )
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        # CLIP prepends a CLS token (+1) that the "default" strategy drops again (-1): grid**2 image tokens.
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_qwen2_vl(tok, image_size: int, dims: Dims):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
        Qwen2VLVideoProcessor,
        Qwen2VLVisionConfig,
    )

    patch, head_dim = image_size // dims.grid, dims.hidden // dims.heads
    # M-RoPE splits each head's rotary half into (temporal, height, width) sections, 2:3:3 as Qwen2-VL's 16:24:24.
    mrope = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    assert sum(mrope) == head_dim // 2
    config = Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(
            **_text_dims(tok, dims), rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
        ),
        vision_config=Qwen2VLVisionConfig(
            depth=dims.layers,
            embed_dim=dims.hidden,
            hidden_size=dims.hidden,
            num_heads=dims.heads,
            mlp_ratio=dims.mlp // dims.hidden,
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id,
        vision_end_token_id=tok.vision_end_token_id,
    )
    # min_pixels == max_pixels: every image is resized to image_size**2 pixels, grid x grid patches.
    pixels = dict(min_pixels=image_size**2, max_pixels=image_size**2, patch_size=patch, merge_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, temporal_patch_size=2),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels, temporal_patch_size=2),
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _build_idefics3(tok, image_size: int, dims: Dims):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    seq = (dims.grid // 2) ** 2  # the connector's pixel shuffle with scale_factor 2 merges 2x2 patches
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_vision_dims(image_size, dims)),
        text_config={"model_type": "llama", **_text_dims(tok, dims)},
        image_token_id=tok.image_token_id,
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    edge = {"longest_edge": image_size}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size=edge, max_image_size=edge, do_image_splitting=False),
        tokenizer=tok,
        image_seq_len=seq,
    )
    return Idefics3ForConditionalGeneration(config), processor


_CHATML_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}  # Qwen2 has no BOS

RECIPES: dict[str, _Recipe] = {
    "internvl": _Recipe(
        tokens={
            **_CHATML_TOKENS,
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        extra=("<|im_start|>",),
        chat_template=_template(_CHATML, SYSTEM="", IMAGE="<IMG_CONTEXT>\\n"),
        build=_build_internvl,
    ),
    "llava": _Recipe(
        tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "<image>"},
        chat_template=_LLAVA,
        build=_build_llava,
    ),
    "qwen2_vl": _Recipe(
        tokens={
            **_CHATML_TOKENS,
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        extra=("<|im_start|>",),
        chat_template=_template(_CHATML, SYSTEM=_QWEN_SYSTEM, IMAGE="<|vision_start|><|image_pad|><|vision_end|>"),
        build=_build_qwen2_vl,
    ),
    "idefics3": _Recipe(
        tokens={
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<end_of_utterance>",
            "pad_token": "<pad>",
            "image_token": "<image>",
        },
        # The processor looks these up even without image splitting (the row/col tags name the tiles).
        extra=(
            "<fake_token_around_image>",
            "<global-img>",
            *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
        ),
        chat_template=_IDEFICS3,
        build=_build_idefics3,
    ),
}


def _recipe(family: str, option: str = "--family") -> _Recipe:
    if family not in RECIPES:
        raise ConfigError(
            f"{option}: unknown tiny VLM family {family!r}{suggest(family, FAMILY_NAMES)}; "
            f"valid families: {', '.join(FAMILY_NAMES)}."
        )
    return RECIPES[family]


def _check(family: str, image_size: int, dims: Dims, option: str = "--family") -> None:
    _recipe(family, option)
    if image_size % dims.grid or image_size < 4 * dims.grid:
        raise ConfigError(
            f"--image-size: {image_size} px is not supported; use a multiple of {dims.grid}, at least "
            f"{4 * dims.grid} (MedMNIST: 28, 64, 128, 224)."
        )


# ------------------------------------------------------------------------------------------------ tokenizer
def _corpus(generalist: bool = False) -> list[str]:
    """The texts a tiny model's tokenizer is learned on.

    Random tiny models: every instruction and response VITask can produce for the twelve MedMNIST datasets, so
    each label is one token. A generalist: the generic corpus only (with its made-up words), so a MedMNIST label
    is a sequence of sub-word pieces the generalist has read and written, as a rare word is for a real LLM; no
    MedMNIST text reaches its tokenizer or its weights.
    """
    if generalist:
        return [*CHAT_WORDS[:10], *corpus_texts()]  # roles and the system prompt, not the MedMNIST lines

    texts = list(CHAT_WORDS)
    for spec in dataset_specs(FLAGS):
        texts += [instruction(spec), instruction(spec, incomplete=True), *candidate_responses(spec)]
    return texts


def _train_tokenizer(recipe: _Recipe, texts: list[str], vocab: int = VOCAB):
    """A byte-level BPE learned on ``texts`` (tens of milliseconds), with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(dict.fromkeys([*recipe.tokens.values(), *recipe.extra]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each text is given alone and after a space, so a label learns one token both as an answer that starts a
    # turn ("melanoma") and inside the instruction's list (" melanoma").
    bpe.train_from_iterator([*texts, *(" " + t for t in texts)], trainer=trainer)
    named = {k: v for k, v in recipe.tokens.items() if k in ("bos_token", "eos_token", "pad_token")}
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        **named,
        extra_special_tokens={k: v for k, v in recipe.tokens.items() if k not in named},
        chat_template=recipe.chat_template,
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------------------------------- building
def _widen_token_embeddings(model) -> None:
    """Token embeddings (tied to the LM head) with std 1.2/sqrt(hidden) instead of transformers' 0.02.

    A pretrained LLM's head spans a wide logit range; at 0.02 a 64-wide random head cannot exceed about one
    logit of margin, so a frozen head caps what LoRA can learn (loss stuck near ln V). At this scale initial
    logits have std ~1.2 and LoRA can reach confident answers within a few hundred steps.
    """
    import torch

    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight.normal_(0.0, 1.2 / emb.weight.shape[1] ** 0.5)


def _pretrain_text(model, processor, steps: int, seed: int) -> None:
    """Language-model warm-up on VITask's own text: every instruction with every candidate response, no image.

    A random language model under frozen-base LoRA learns almost nothing in a CPU-sized run (loss stays near
    ln V), unlike the pretrained LLM inside a real VLM. A few hundred steps of next-token training on the
    prompt corpus give the tiny model the chat format and the label vocabulary, but no knowledge of the
    images (the vision tower and projector stay random). Text-only, so nothing of the task's image-label
    mapping leaks in. The generalist (``tiny:<family>-generalist``) replaces this with real pretraining.
    """
    import torch

    texts = []
    for spec in dataset_specs(FLAGS):
        for incomplete in (False, True):
            for answer in candidate_responses(spec):
                user = [{"type": "text", "text": instruction(spec, incomplete=incomplete)}]
                turns = [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
                texts.append(processor.apply_chat_template(turns, tokenize=False))
    tok = processor.tokenizer
    decoder = getattr(model.model, family_of(model.config.model_type).language)
    params = list(decoder.parameters()) + list(model.get_output_embeddings().parameters())
    params = list({id(p): p for p in params}.values())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(texts), (32,), generator=generator).tolist()
        enc = tok([texts[i] for i in picks], return_tensors="pt", padding=True, add_special_tokens=False)
        out = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        logits = model.get_output_embeddings()(out.last_hidden_state[:, :-1]).float()
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@dataclass(frozen=True)
class Build:
    """How one tiny VLM is made: its family, image size, seed and training (none, text warm-up or generalist)."""

    family: str
    image_size: int = 28
    seed: int = 0
    pretrain_steps: int = 0  # text-only warm-up (random tiny models)
    generalist_steps: int = 0  # generic image-text pretraining of every weight (0: not a generalist)
    held_out: int = 200  # generalist: held-out questions per task in the final check (generalist.json)
    shape: Dims | None = None  # other sizes than the tiny ones (the bench's presets, vitask_pl/models/shapes.py)

    @property
    def dims(self) -> Dims:
        if self.shape is not None:
            return self.shape
        return GENERALIST if self.generalist_steps else RANDOM

    def describe(self) -> str:
        if self.generalist_steps:
            return f", generalist: {self.generalist_steps} image-text pretraining steps"
        return f", {self.pretrain_steps} text warm-up steps" if self.pretrain_steps else ""


def _write(build: Build, out: Path) -> tuple[str, int]:
    """Build the model and processor and save both into ``out``; returns (class name, parameters)."""
    import torch

    recipe = _recipe(build.family)
    generalist = bool(build.generalist_steps)
    tok = _train_tokenizer(recipe, _corpus(generalist), GENERALIST_VOCAB if generalist else VOCAB)
    torch.manual_seed(build.seed)
    model, processor = recipe.build(tok, build.image_size, build.dims)
    _widen_token_embeddings(model)
    processor.chat_template = recipe.chat_template
    if build.pretrain_steps:
        _pretrain_text(model, processor, build.pretrain_steps, build.seed)
    card = None
    if build.generalist_steps:
        card = pretrain(
            model,
            processor,
            steps=build.generalist_steps,
            image_size=build.image_size,
            seed=build.seed,
            held_out=build.held_out,
        )
        card = {"recipe": GENERALIST_VERSION, "dims": build.dims.__dict__, **card}
    # generate() stops at the end-of-turn token and pads with pad, as the real chat checkpoints do.
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if card is not None:
        (out / "generalist.json").write_text(json.dumps(card, indent=2) + "\n")
    return type(model).__name__, sum(p.numel() for p in model.parameters())


def _build(build: Build, out: Path, replace: bool) -> bool:
    """Build into a temporary sibling of ``out`` and rename it into place, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(out, "tmp")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to others
    import torch

    try:
        # The build seeds torch itself; forking keeps the caller's RNG as it was, so a run that builds its tiny
        # model on first use draws the same LoRA and connector weights as a run that finds it cached.
        with torch.random.fork_rng(devices=[]):
            name, n_params = _write(build, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not publish_dir(tmp, out, replace):
        return False
    print(
        f"tiny-vlm: wrote {build.family} ({name}, {n_params:,} parameters, {build.image_size} px, seed {build.seed}"
        f"{build.describe()}) to {out}"
    )
    return True


def build_tiny_vlm(
    family: str,
    out: str,
    image_size: int = 28,
    seed: int = 0,
    force: bool = False,
    pretrain_steps: int = 0,
    generalist_steps: int = 0,
    held_out: int = 200,
    shape: Dims | None = None,
) -> str:
    """Build a tiny ``family`` VLM and save it to ``out``; returns ``out``.

    ``pretrain_steps`` > 0 warms a random model's language model up on the prompt text (:func:`_pretrain_text`);
    ``generalist_steps`` > 0 builds the generalist instead (:func:`vitask_pl.models.generalist.pretrain`).
    """
    build = Build(family, image_size, seed, pretrain_steps, generalist_steps, held_out, shape)
    _check(build.family, build.image_size, build.dims)
    path = Path(out).expanduser()
    if is_nonempty(path) and not force:
        raise overwrite_error(path)
    if not _build(build, path, replace=force):
        raise overwrite_error(path)  # another process wrote ``out`` while this one was building
    return str(path)


def tiny_cache_dir() -> Path:
    """``$VITASK_CACHE/tiny``, else ``~/.cache/vitask/tiny``."""
    root = os.environ.get("VITASK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vitask") / "tiny"


def spec_build(spec: str, image_size: int = 28, *, option: str = "--family") -> tuple[Build, str]:
    """``"tiny:<family>[-generalist]"`` -> (its :class:`Build`, its cache folder name)."""
    name = spec[len(TINY_PREFIX) :]
    if name.endswith(GENERALIST_SUFFIX):
        family = name[: -len(GENERALIST_SUFFIX)]
        build = Build(family, image_size, generalist_steps=GENERALIST_STEPS)
        folder = f"{family}-generalist-{image_size}px-{GENERALIST_VERSION}"
    else:
        family = name
        build = Build(family, image_size, pretrain_steps=SPEC_PRETRAIN_STEPS)
        folder = f"{family}-{image_size}px-{VERSION}"
    _check(family, image_size, build.dims, option)
    return build, folder


def resolve_tiny(spec: str, image_size: int = 28, *, option: str = "--family") -> str:
    """``"tiny:<family>"`` or ``"tiny:<family>-generalist"`` -> its cached directory, built there on first use
    (seed 0); other specs unchanged.

    ``tiny:<family>`` gets the text warm-up of ``SPEC_PRETRAIN_STEPS`` steps, so offline runs can learn;
    ``tiny:<family>-generalist`` is pretrained on the generic image-text corpus (a few minutes, once).
    ``option`` is the flag the spec came from, named in the error for an unknown family.
    """
    if not spec.startswith(TINY_PREFIX):
        return spec
    build, folder = spec_build(spec, image_size, option=option)
    target = tiny_cache_dir() / folder
    # Builds are published by rename, so a directory here is complete; a racing build that loses is discarded.
    if not is_nonempty(target):
        _build(build, target, replace=False)
    return str(target)


def tiny_vlm(
    family: str,
    out: str,
    image_size: int = 28,
    seed: int = 0,
    force: bool = False,
    pretrain_steps: int = 0,
    generalist: bool = False,
    generalist_steps: int | None = None,
    held_out: int = 200,
) -> str:
    """Build a tiny VLM of a real transformers class, for offline tests and smoke runs.

    The model has the family's real model and processor classes, chat template and special tokens, and a
    byte-level BPE tokenizer. By default its weights are random (hidden size 64, two layers). With
    ``--generalist`` it is larger and every weight (vision tower, projector, language model) is pretrained on a
    generated, generic image-text corpus of captions, visual questions and multiple-choice questions that never
    mentions the MedMNIST tasks. Load it with ``AutoModelForImageTextToText.from_pretrained(out)`` and
    ``AutoProcessor.from_pretrained(out)``.

    Args:
        family: Model family, one of internvl, llava, qwen2_vl, idefics3.
        out: Directory to write the model and processor to.
        image_size: Input image size in pixels (a multiple of 4, e.g. 28, 64, 128, 224).
        seed: Seed of the weights and of the generalist's corpus; the same seed builds the same model.
        force: Overwrite --out if it exists and is not empty.
        pretrain_steps: Text-only warm-up steps of the language model on the VITask prompts (0: random weights;
            `tiny:<family>` specs use 300 so that offline runs can learn).
        generalist: Pretrain the whole model on the generic image-text corpus (`tiny:<family>-generalist`).
        generalist_steps: Pretraining steps of --generalist (default: the recipe's).
        held_out: Held-out questions per task that --generalist answers at the end (recorded in generalist.json).

    Returns:
        The directory written.
    """
    if generalist_steps is not None and not generalist:
        raise ConfigError("--generalist_steps: given without --generalist; add --generalist.")
    if generalist and pretrain_steps:
        raise ConfigError("--pretrain_steps: a generalist is pretrained on images and text; drop --pretrain_steps.")
    if generalist:
        steps = GENERALIST_STEPS if generalist_steps is None else generalist_steps
        if steps < 1:
            raise ConfigError(f"--generalist_steps: {steps}; use 1 or more.")
        return build_tiny_vlm(family, out, image_size, seed, force, generalist_steps=steps, held_out=held_out)
    return build_tiny_vlm(family, out, image_size, seed, force, pretrain_steps=pretrain_steps)
