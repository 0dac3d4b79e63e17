"""The tiny *generalist*: a tiny VLM whose every weight is pretrained on the generic image-text corpus.

VITask's premise is a generalist VLM: a vision encoder and a language model pretrained together on broad
image-text data, so the model already answers questions about images, but was never specialised for the
task. A random tiny VLM is not that (it has never looked at an image), so a baseline tuned from it measures
how fast a random network learns rather than the method. ``tiny:<family>-generalist`` is built here, once:

- the corpus is :mod:`vitask_pl.data.generic` (shapes, stripes and blobs; captions, visual questions and
  multiple-choice questions whose options are listed in the prompt), drawn fresh every step from the seed;
- all weights train: vision tower, projector, language model, embeddings;
- the conversations go through the same chat template, processor and label masking as every VITask stage
  (:meth:`vitask_pl.data.chat.ChatBatch.encode`), so the format the model learns is the one it is tuned in;
- at the end it answers held-out questions of its own tasks, and ``generalist.json`` beside the weights records
  the recipe and those accuracies against chance.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from vitask_pl.data.chat import ChatBatch, ChatTemplate
from vitask_pl.data.generic import conversation, random_scene, render

BATCH = 32
LR = 2e-3
WARMUP = 0.05  # fraction of steps
HELD_OUT = 200  # questions per task in the final check


def _batches(steps: int, image_size: int, seed: int):
    """``(images, instructions, responses)`` of each step; pure in (seed, step)."""

    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        scenes = [random_scene(rng) for _ in range(BATCH)]
        images = [render(s, image_size, rng) for s in scenes]
        turns = [conversation(s, rng)[1:] for s in scenes]
        yield images, [t[0] for t in turns], [t[1] for t in turns]


def pretrain(model, processor, *, steps: int, image_size: int, seed: int, held_out: int = HELD_OUT) -> dict:
    """Train every weight of ``model`` on ``steps`` batches of the generic corpus; returns the build's card."""
    import torch

    encoder = ChatBatch(processor, [])
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, int(WARMUP * steps))

    def schedule(step: int) -> float:  # linear warm-up, cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    torch.manual_seed(seed)
    # A one-off build in its own process: both cores help here (0.28 -> 0.17 s a step on two), unlike the many
    # small processes of a test run that OMP_NUM_THREADS=1 is set for.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))
    model.train()
    start, losses = time.monotonic(), []
    for step, (images, instructions, responses) in enumerate(_batches(steps, image_size, seed)):
        _, enc, labels, _ = encoder.encode(images, instructions, responses)
        loss = model(**enc, labels=labels, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"tiny-vlm: generalist step {step + 1}/{steps}, loss {recent:.3f}, {time.monotonic() - start:.0f} s")
    model.eval()
    torch.set_num_threads(threads)
    return {
        "steps": steps,
        "batch_size": BATCH,
        "lr": LR,
        "seed": seed,
        "image_size": image_size,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": time.monotonic() - start,
        "held_out": evaluate(model, processor, image_size=image_size, seed=seed, n=held_out),
    }


def evaluate(model, processor, *, image_size: int, seed: int, n: int = HELD_OUT) -> dict:
    """Greedy answers to held-out conversations of each task: exact-match accuracy beside chance.

    Held out: scenes are drawn from a stream (``[seed, 2**31]``) that no training step (``[seed, step]``) uses.
    Chance is 1/options for a multiple-choice question and 1/(possible answers) for a short question; captions
    are scored by exact match with no chance level (there are thousands of captions).
    """
    import torch

    template = ChatTemplate(processor)
    tok = template.tokenizer
    rng = np.random.default_rng([seed, 2**31])
    out = {}
    for task in ("question", "choice", "caption"):
        correct, chance = 0, 0.0
        for lo in range(0, n, 50):
            scenes = [random_scene(rng) for _ in range(min(50, n - lo))]
            images = [render(s, image_size, rng) for s in scenes]
            convs = [conversation(s, rng, task) for s in scenes]
            prompts = [template.render(c[1]) for c in convs]
            enc = processor(
                text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True, padding_side="left"
            )
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=24, do_sample=False)
            answers = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for scene, (_, instruction, response), answer in zip(scenes, convs, answers):
                correct += answer.strip() == response
                if task == "choice":
                    chance += 1 / (instruction.rsplit(":", 1)[1].count(",") + 1)
                elif task == "question":
                    pool = next(p for q, _, p in scene.questions() if q == instruction)
                    chance += 1 / len(pool)
        out[task] = {"accuracy": correct / n, "chance": chance / n if task != "caption" else None, "n": n}
    return out
