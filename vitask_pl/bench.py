"""``vitask bench``: step time and peak memory of the training variants, measured side by side in one run.

Numbers are ratios against a baseline measured in the same process on the same tiny model and batch, so
they travel across machines better than absolute times; still, a 2-core CPU is noisy: read them as sizes.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from vitask_pl.losses import crt, rda_kl, response_nll


class PeakMemory:
    """Memory of one call. CUDA: the allocator's peak above the start. CPU (no allocator statistics): the bytes
    of activations autograd saves for backward, parameters excluded, which is what the variants differ in."""

    def __init__(self, device: torch.device, params=()):
        self.device, self.peak = device, 0
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        seen = set()

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in self.param_ptrs:
                seen.add(ptr)
                self.peak += t.untyped_storage().nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._hooks.__exit__(*exc)


class Timing(NamedTuple):
    fastest: float  # seconds of the fastest round
    median: float  # seconds, the median round
    mib: float  # memory of one call, see PeakMemory
    faults: float  # median minor page faults per timed call: fresh pages the allocator mapped (README, "Benchmark")


Variants = dict[str, Callable[[], None]]


def measure(
    groups: list[tuple[Variants, Callable[[], AbstractContextManager]]],
    device: torch.device,
    steps: int,
    blocks: int = 4,
    params=(),
) -> dict[str, Timing]:
    """``{name: Timing}`` of each variant of each ``(variants, mode)`` group (the training steps; the evaluation
    passes, under ``mode()``).

    A group's variants are timed in rounds, each round calling every variant once, so a slow spell of a noisy
    machine falls on all of them alike. The groups take turns in ``blocks`` blocks spread over the run, so a slow
    spell cannot cover all of one group's rounds either (timed one group after the other, one run's evaluation
    rows all came out 2.5x slow). Within a block a group runs back to back, as in a training or an evaluation
    loop, after one untimed round that warms what the other group left cold. The ratios use the fastest round:
    on a shared machine noise only ever adds time, so the minimum is the estimate of what the step costs (as
    ``timeit`` advises); the median is printed beside it to show the spread. Memory: see :class:`PeakMemory`.
    """
    times: dict[str, list[float]] = {name: [] for fns, _ in groups for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in times}
    blocks = max(1, min(blocks, steps))
    for block in range(blocks):
        rounds = steps // blocks + (block < steps % blocks)
        for fns, mode in groups:
            with mode():
                for timed in [False] + [True] * rounds:
                    for name, fn in fns.items():
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start, mapped = time.perf_counter(), _minor_faults()
                        fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        if timed:
                            times[name].append(time.perf_counter() - start)
                            faults[name].append(_minor_faults() - mapped)
    out = {}
    for fns, mode in groups:
        with mode():
            for name, fn in fns.items():
                with PeakMemory(device, params) as mem:
                    fn()
                out[name] = Timing(
                    min(times[name]), statistics.median(times[name]), mem.peak / 2**20, statistics.median(faults[name])
                )
    return out


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocator() -> str:
    """The glibc setting a CPU run was timed under: large CPU tensors cost page faults every step unless the heap
    keeps them (README, "Benchmark"), so CPU times are comparable only under the same setting."""
    return f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset: glibc default)')}"


def _tiny_tsm_checkpoint(path: Path, flags: list[str], image_size: int) -> str:
    """An untrained TSM checkpoint (timing does not depend on its weights)."""
    from vitask_pl.fingerprint import save_untrained
    from vitask_pl.modules.tsm import TSMModule

    return save_untrained(TSMModule("resnet18", datasets=flags, image_size=image_size), path)


def bench(
    family: str = "internvl",
    preset: str = "tiny",
    batch_size: int = 8,
    steps: int = 20,
    image_size: int = 28,
    datasets: list[str] | None = None,
    device: str = "auto",
    vlm: str | None = None,
    peak_tflops: float | None = None,
) -> dict:
    """Print step time, memory and FLOPs of the VITask training and evaluation variants, side by side.

    Args:
        family: tiny model family (``preset: tiny``, no ``vlm``).
        preset: ``tiny`` (the test models: 4 image tokens, a ~900-token vocabulary), ``proportional`` (256 image
            tokens at 448 px, a 32k vocabulary, narrow enough for a CPU) or ``real`` (InternVL3-2B's sizes,
            random weights; for the GPU). See vitask_pl/models/shapes.py for the exact shapes.
        batch_size: samples per step.
        steps: timed rounds, each calling every variant once (the fastest round is reported, the median beside it),
            in blocks where training and evaluation variants take turns (see :func:`measure`).
        image_size: image size of the tiny model and of the synthetic data (presets: the data's; the model
            resizes to 448 px).
        datasets: MedMNIST flags to draw the batch from.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        vlm: a VLM spec (hub id, directory, ``tiny:<family>``) instead of ``family`` / ``preset``.
        peak_tflops: the chip's dense bf16 peak (H100/H200 SXM: 989); adds each training variant's MFU, the
            model FLOPs of vitask_pl/flops.py per second over that peak.
    """
    from vitask_pl.errors import ConfigError
    from vitask_pl.models.shapes import SHAPES

    if preset != "tiny" and preset not in SHAPES:
        raise ConfigError(f"--preset: {preset!r}; use tiny, {', '.join(SHAPES)}.")
    flags = datasets or ["dermamnist", "chestmnist", "bloodmnist", "pneumoniamnist"]
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    with tempfile.TemporaryDirectory(prefix="vitask-bench-") as tmp:  # data, TSM and model of this run only
        if preset != "tiny" and vlm is None:
            from vitask_pl.models.shapes import build_shaped, describe

            print(f"vitask bench — building {describe(preset)}")
            vlm = build_shaped(preset, str(Path(tmp) / preset))
            image_size = max(image_size, 224)  # the processor resizes to the preset's 448 px
        show_targets = preset == "proportional"  # the targets are set at the real sequence structure
        return _bench(Path(tmp), family, batch_size, steps, image_size, flags, dev, vlm, peak_tflops, show_targets)


def _bench(
    tmp: Path,
    family: str,
    batch_size: int,
    steps: int,
    image_size: int,
    flags: list[str],
    dev,
    vlm,
    peak_tflops,
    show_targets: bool = False,
) -> dict:
    from vitask_pl.data.datamodule import MedMNISTDataModule
    from vitask_pl.data.synth import synthesize
    from vitask_pl.eval.protocols import candidate_loglik, encode_prefix, greedy_generate
    from vitask_pl.flops import counts, step_flops
    from vitask_pl.modules.vitask import ExemplarPromptTuning

    synthesize(tmp, flags, image_size, per_class=4, seed=0)
    dm = MedMNISTDataModule(str(tmp), flags, image_size, num_workers=0)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    module = ExemplarPromptTuning(
        tsm_ckpt=_tiny_tsm_checkpoint(tmp / "tsm.ckpt", flags, image_size),
        vlm=vlm or f"tiny:{family}",
        datasets=flags,
        image_size=image_size,
        exemplar={"feature_cache": False},
        vlm_options={"dtype": dtype},
    ).to(dev)
    model, v, pad_id = module.model, module.model.vlm, module.collate.pad_id
    ds = dm.dataset("train", negatives=True)
    samples = [ds[i * len(ds) // batch_size] for i in range(batch_size)]
    batch = module.collate(samples)

    def to_dev(x):
        return {k: to_dev(t) for k, t in x.items()} if isinstance(x, dict) else (x.to(dev) if torch.is_tensor(x) else x)

    batch = to_dev(batch)
    features = model.source.features(batch, "train")

    def backward(loss):
        loss.backward()
        module.zero_grad(set_to_none=True)

    def vanilla_response_only():
        logits, targets, _ = model.plain(batch)
        backward(response_nll(logits, targets))

    def vanilla_full_logits():  # what a generic causal-LM loss does: the head at every position
        embeds = v.embed(batch["input_ids"], v.image_features(batch["pixel"]))
        positions = v.positions(batch["input_ids"], batch["attention_mask"], *_mrope(batch))
        hidden, _ = v.decode(embeds, batch["attention_mask"], positions)
        logits = v.head(hidden)[:, :-1]
        labels = batch["labels"][:, 1:]
        backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100))

    def stage2_terms(views, targets):
        return (
            response_nll(views["plain"], targets)
            + response_nll(views["ep"], targets)
            + rda_kl(views["plain"], views["ep"])
            + crt(views["plain"], views["neg"], targets)
        )

    def stage2(prefix_sharing: bool):
        def step():
            views = model.fused_views(batch, features, pad_id, negatives=True, prefix_sharing=prefix_sharing)
            backward(stage2_terms(views, views["targets"]))

        return step

    def stage2_separate():  # three forwards, each running the vision tower on its own images
        ep_logits, targets, _ = model.ep(batch, features, pad_id)
        plain, _, _ = model.plain(batch)
        neg, _, _ = model.plain(batch, batch["neg_pixel"])
        backward(stage2_terms({"ep": ep_logits, "plain": plain, "neg": neg}, targets))

    @contextmanager
    def evaluating():
        module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            module.train()

    def evaluate_score():
        candidate_loglik(v, encode_prefix(v, batch), batch["cand_ids"], batch["cand_mask"])

    def evaluate_generate():
        greedy_generate(v, encode_prefix(v, batch), module.eval_settings.max_new_tokens, module.collate.stop_ids)

    module.train()
    training = {  # name -> (step, FLOP variant)
        "vanilla, response-only logits": (vanilla_response_only, "vanilla"),
        "vanilla, full logits": (vanilla_full_logits, "full"),
        "stage 2, fused views": (stage2(False), "fused"),
        "stage 2, shared prefix": (stage2(True), "shared"),
        "stage 2, three forwards": (stage2_separate, "separate"),
    }
    groups = [
        ({name: fn for name, (fn, _) in training.items()}, nullcontext),
        ({"eval score": evaluate_score, "eval generate": evaluate_generate}, evaluating),
    ]
    results = measure(groups, dev, steps, params=list(module.parameters()))

    ids = batch["input_ids"]
    is_image = ids == v.image_token_id
    prefix = int(ids.shape[1] - is_image.flip(1).int().argmax(dim=1)[0])  # up to the last image token
    c = counts(v, patches=_patches(v, batch))
    slots = features.shape[1] if features.ndim == 3 else model.connector.num_tokens
    flops = {
        name: step_flops(c, batch, variant=variant, slots=slots, prefix=prefix)
        for name, (_, variant) in training.items()
    }
    n_tokens = int((batch["labels"] != -100).sum())
    print(
        f"vitask bench — {vlm or 'tiny:' + family}, batch {len(ids)}, {dev.type}, sequence {ids.shape[1]} tokens "
        f"({int(is_image[0].sum())} image, shared prefix {prefix}, {n_tokens} response in all), vocab {c.vocab:,}"
    )
    if dev.type == "cpu":
        print(allocator())
    memory = "peak MiB" if dev.type == "cuda" else "saved MiB"  # CPU: activations kept for backward
    base_t, _, base_m, _ = results["vanilla, response-only logits"]
    base_f = flops["vanilla, response-only logits"]
    mfu_head = f"{'MFU':>7}" if peak_tflops else ""
    cpu = dev.type == "cpu"  # fresh pages a step maps are CPU time that no FLOP count holds
    print(
        f"{'variant':<32}{'ms/step':>10}{'median':>9}{memory:>11}{'faults' if cpu else '':>8}"
        f"{'GFLOP':>10}{'time x':>9}{'FLOP x':>9}{'time/FLOP':>11}{mfu_head}"
    )
    mfu = {}
    for name, (sec, median, mib, faults) in results.items():
        row = f"{name:<32}{sec * 1e3:>10.1f}{median * 1e3:>9.1f}{mib:>11.2f}{f'{faults:.0f}' if cpu else '':>8}"
        if name in flops:
            t_ratio, f_ratio = sec / base_t, flops[name] / base_f
            row += f"{flops[name] / 1e9:>10.3f}{t_ratio:>9.2f}{f_ratio:>9.2f}{t_ratio / f_ratio:>11.2f}"
            if peak_tflops:
                mfu[name] = flops[name] / sec / (peak_tflops * 1e12)
                row += f"{mfu[name]:>7.1%}"
        print(row)

    def ratio(a, b):
        return a / b if b > 0 else float("nan")

    def t(name):
        return results[name].fastest

    def m(name):
        return results[name].mib

    def goal(text):
        return f" (target {text})" if show_targets else ""

    lines = {
        "full / response-only logits, time": ratio(t("vanilla, full logits"), base_t),
        "full / response-only logits, memory": ratio(m("vanilla, full logits"), base_m),
        "stage-2 fused / vanilla, time": ratio(t("stage 2, fused views"), base_t),
        "stage-2 shared prefix / vanilla, time" + goal("<= 2.4"): ratio(t("stage 2, shared prefix"), base_t),
        "stage-2 fused / vanilla, memory": ratio(m("stage 2, fused views"), base_m),
        "stage-2 shared prefix / vanilla, memory" + goal("<= 2.5"): ratio(m("stage 2, shared prefix"), base_m),
        "three forwards / fused, time": ratio(t("stage 2, three forwards"), t("stage 2, fused views")),
        "three forwards / fused, memory": ratio(m("stage 2, three forwards"), m("stage 2, fused views")),
        "score / generate throughput" + goal(">= 2"): ratio(t("eval generate"), t("eval score")),
    }
    print("ratios (same process, same batch):")
    for name, value in lines.items():
        print(f"  {name:<56}{value:>8.2f}")
    return {
        "ms": {k: r.fastest * 1e3 for k, r in results.items()},
        "median_ms": {k: r.median * 1e3 for k, r in results.items()},
        "mib": {k: r.mib for k, r in results.items()},
        "faults": {k: r.faults for k, r in results.items()},
        "gflop": {k: f / 1e9 for k, f in flops.items()},
        "mfu": mfu,
        "ratios": lines,
    }


def _patches(v, batch: dict) -> int:
    """Vision-tower tokens per image: Qwen2-VL's flat patch rows, else (side / patch size) squared."""
    pixels = batch["pixel"]["pixel_values"]
    if pixels.ndim == 2:  # Qwen2-VL: (patches in the batch, channels * patch * patch)
        return pixels.shape[0] // len(batch["input_ids"])
    patch = v.model.config.vision_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return (pixels.shape[-1] // patch) ** 2 * (pixels.shape[1] if pixels.ndim == 5 else 1)


def _mrope(batch: dict) -> tuple:
    """Qwen2-VL's M-RoPE inputs of a batch (token types, image grids); ``None`` for the other families."""
    types = batch.get("mm_token_type_ids")
    return types, batch["pixel"].get("image_grid_thw") if types is not None else None
