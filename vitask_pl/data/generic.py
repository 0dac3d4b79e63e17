"""A generic image-text corpus, generated: what a tiny VLM pretrains on to become a *generalist*.

Scenes are compositions of shapes, stripes and soft blobs, in colour or in gray, of several sizes, counts,
positions, orientations, frequencies and backdrop textures. Each scene yields the three kinds of
conversation generalist VLMs learn from:

- a **caption** ("two large red circles on a grainy backdrop");
- a **short visual question** ("How many shapes are there?" -> "two");
- a **multiple-choice question** that lists its options in the prompt and is answered with one of them
  ("Which option fits this image? The possible answers are: vertical stripes, horizontal stripes." -> ...).

Nothing here is a MedMNIST class, label name, modality phrase or instruction: the model learns "look at the
image and pick the listed option that fits", never the downstream task. Deterministic in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring", "cross")
COLOURS = {"red": (220, 45, 40), "green": (40, 190, 70), "blue": (50, 90, 230), "yellow": (225, 205, 40)}
GRAYS = {"bright": 225, "dark": 25}  # gray scenes name the shade instead of a colour
SIZES = ("small", "large")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
# Eight stripe directions 22.5 degrees apart, and four stripe frequencies: fine distinctions a generalist's vision
# tower must keep to tell them apart (coarse ones alone train it to discard detail).
ORIENTATIONS = {
    "horizontal": 0.0,
    "gently rising": -np.pi / 8,
    "rising diagonal": -np.pi / 4,
    "steeply rising": -3 * np.pi / 8,
    "vertical": np.pi / 2,
    "steeply falling": 3 * np.pi / 8,
    "falling diagonal": np.pi / 4,
    "gently falling": np.pi / 8,
}
WIDTHS = {"wide": (1.5, 2.0), "medium": (3.0, 3.5), "narrow": (4.5, 5.0), "fine": (6.0, 7.0)}  # cycles per image
TEXTURES = {"smooth": 4.0, "grainy": 20.0, "very grainy": 40.0}  # pixel noise std
KINDS = ("shapes", "stripes", "blobs", "stripes and blobs")

# Multiple-choice prompts, deliberately generic (none is the downstream instruction).
MC_LEADS = (
    "Look at the picture. The possible answers are: {options}.",
    "Which option fits this image? The possible answers are: {options}.",
    "What does the image show? Choose one of: {options}.",
    "Classify the picture. The options are: {options}.",
    "Pick the description that matches the image: {options}.",
)
CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Give a short caption for the image.")
REPEAT_PROMPTS = ("Repeat the word: {word}.", "Say this: {word}.", "Write the following words: {word}.")
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxz", "aeiouy"


def pseudo_word(rng: np.random.Generator) -> str:
    """A made-up word or two (``"tarvel"``, ``"mo-kisp dralen"``): spelling practice for novel names.

    A real LLM has met every sub-word piece of a rare word somewhere; these give the tiny generalist that, so an
    answer it has never seen (any label name of a new task) is a sequence of pieces it can already read and copy.
    """
    words = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        syllables = [
            str(rng.choice(list(_CONSONANTS))) * int(rng.random() < 0.8)
            + str(rng.choice(list(_VOWELS)))
            + str(rng.choice(list(_CONSONANTS))) * int(rng.random() < 0.4)
            for _ in range(int(rng.integers(1, 5)))
        ]
        words.append("".join(syllables))
    sep = str(rng.choice([" ", " ", "-"]))
    return sep.join(words)


@dataclass(frozen=True)
class Scene:
    """The attributes of one generated image; ``colour`` is a colour name or a gray shade."""

    kind: str
    colour: str
    texture: str
    shape: str = ""
    size: str = ""
    count: str = ""
    position: str = ""
    orientation: str = ""
    width: str = ""
    blobs: str = ""  # blob count over the stripes of a "stripes and blobs" scene

    @property
    def gray(self) -> bool:
        return self.colour in GRAYS

    def caption(self) -> str:
        bg = f"on a {self.texture} backdrop"
        if self.kind == "stripes":
            return f"{self.width} {self.orientation} {self.colour} stripes {bg}"
        if self.kind == "stripes and blobs":
            blobs = f"{self.blobs} soft blob{'s' if self.blobs != 'one' else ''}"
            return f"{self.width} {self.orientation} {self.colour} stripes with {blobs} {bg}"
        if self.kind == "blobs":
            where = f" at the {self.position}" if self.position else ""
            return f"{self.count} soft {self.colour} blob{'s' if self.count != 'one' else ''}{where} {bg}"
        if self.count == "one":
            return f"a {self.size} {self.colour} {self.shape} at the {self.position} {bg}"
        plural = self.shape + ("es" if self.shape == "cross" else "s")
        return f"{self.count} {self.size} {self.colour} {plural} {bg}"

    def questions(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(question, answer, every possible answer)`` for each attribute this scene has."""
        shade = tuple(GRAYS) if self.gray else tuple(COLOURS)
        out = [
            ("What kind of pattern is this?", self.kind, KINDS),
            ("How grainy is the backdrop?", self.texture, tuple(TEXTURES)),
        ]
        if self.kind == "shapes":
            out += [
                ("What shape is shown?", self.shape, SHAPES),
                ("What colour are the shapes?", self.colour, shade),
                ("How big are the shapes?", self.size, SIZES),
                ("How many shapes are there?", self.count, COUNTS),
            ]
            if self.count == "one":
                out.append(("Where is the shape?", self.position, POSITIONS))
        elif self.kind.startswith("stripes"):
            out += [
                ("Which way do the stripes run?", self.orientation, tuple(ORIENTATIONS)),
                ("How wide are the stripes?", self.width, tuple(WIDTHS)),
                ("What colour are the stripes?", self.colour, shade),
            ]
            if self.blobs:
                out.append(("How many blobs are there?", self.blobs, COUNTS[:2]))
        else:
            out += [
                ("How many blobs are there?", self.count, COUNTS),
                ("What colour are the blobs?", self.colour, shade),
            ]
            if self.position:
                out.append(("Where is the blob?", self.position, POSITIONS))
        return out


def random_scene(rng: np.random.Generator) -> Scene:
    kind = KINDS[rng.integers(len(KINDS))]
    gray = rng.random() < 0.5
    colour = str(rng.choice(list(GRAYS) if gray else list(COLOURS)))
    texture = str(rng.choice(list(TEXTURES)))
    if kind.startswith("stripes"):
        stripes = dict(orientation=str(rng.choice(list(ORIENTATIONS))), width=str(rng.choice(list(WIDTHS))))
        blobs = str(rng.choice(COUNTS[:2])) if kind == "stripes and blobs" else ""
        return Scene(kind, colour, texture, blobs=blobs, **stripes)
    if kind == "blobs":
        count = str(rng.choice(COUNTS))
        position = str(rng.choice(POSITIONS)) if count == "one" else ""
        return Scene(kind, colour, texture, count=count, position=position)
    count = str(rng.choice(COUNTS[:3]))
    position = str(rng.choice(POSITIONS)) if count == "one" else ""
    size = str(rng.choice(SIZES))
    return Scene(kind, colour, texture, shape=str(rng.choice(SHAPES)), size=size, count=count, position=position)


# ------------------------------------------------------------------------------------------------ rendering
_CORNERS = {
    "top left": (-0.5, -0.5),
    "top right": (-0.5, 0.5),
    "bottom left": (0.5, -0.5),
    "bottom right": (0.5, 0.5),
    "centre": (0.0, 0.0),
}


def _shape_mask(shape: str, yy, xx, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
    if shape == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= r**2) & (d >= (0.55 * r) ** 2)
    return ((np.abs(dy) <= 0.3 * r) & (np.abs(dx) <= r)) | ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r))


def _centres(rng: np.random.Generator, n: int, r: float) -> list[tuple[float, float]]:
    """``n`` centres in [-1, 1]^2 that keep shapes of radius ``r`` apart (rejection sampling, bounded)."""
    out: list[tuple[float, float]] = []
    lim = 1.0 - r
    for _ in range(200):
        c = tuple(rng.uniform(-lim, lim, 2))
        if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 > (2.2 * r) ** 2 for o in out):
            out.append(c)
            if len(out) == n:
                break
    while len(out) < n:  # crowded: allow overlap rather than loop forever
        out.append(tuple(rng.uniform(-lim, lim, 2)))
    return out


def _blobs(rng: np.random.Generator, n: int, position: str, yy, xx) -> np.ndarray:
    """``(H, W, 1)`` opacity of ``n`` soft Gaussian blobs (one at ``position`` when given)."""
    alpha = np.zeros((*yy.shape, 1))
    if position:
        cy, cx = _CORNERS[position]
        centres = [(cy + rng.uniform(-0.08, 0.08), cx + rng.uniform(-0.08, 0.08))]
    else:
        centres = _centres(rng, n, 0.35)
    for cy, cx in centres:
        w = rng.uniform(0.18, 0.3)
        alpha[..., 0] = np.maximum(alpha[..., 0], np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w**2)))
    return alpha


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, size, 3)`` uint8 image of ``scene`` (gray scenes have three equal channels)."""
    coords = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    base = rng.uniform(90, 150)
    grain = TEXTURES[scene.texture]
    image = np.full((size, size, 3), base) + rng.normal(0.0, grain, (size, size, 1))
    colour = np.full(3, GRAYS[scene.colour], float) if scene.gray else np.array(COLOURS[scene.colour], float)
    n = COUNTS.index(scene.count) + 1 if scene.count else 0
    if scene.kind.startswith("stripes"):
        angle = ORIENTATIONS[scene.orientation]
        cycles = rng.uniform(*WIDTHS[scene.width])
        wave = np.cos(np.pi * cycles * (np.cos(angle) * yy + np.sin(angle) * xx) + rng.uniform(0, 2 * np.pi))
        alpha = (wave > 0).astype(float)[..., None]
        if scene.blobs:  # soft blobs of the opposite shade over the stripes
            blobs = _blobs(rng, COUNTS.index(scene.blobs) + 1, "", yy, xx)
            image = image * (1 - blobs) + (255.0 - colour.mean()) * blobs
    elif scene.kind == "blobs":
        alpha = _blobs(rng, n, scene.position, yy, xx)
    else:
        r = rng.uniform(0.16, 0.22) if scene.size == "small" else rng.uniform(0.32, 0.42)
        if n == 1:
            cy, cx = _CORNERS[scene.position]
            centres = [(cy + rng.uniform(-0.08, 0.08), cx + rng.uniform(-0.08, 0.08))]
        else:
            r = min(r, 0.3)  # several large shapes still fit side by side
            centres = _centres(rng, n, r)
        mask = np.zeros((size, size), bool)
        for cy, cx in centres:
            mask |= _shape_mask(scene.shape, yy, xx, cy, cx, r)
        alpha = mask.astype(float)[..., None]
    image = image * (1 - alpha) + colour * alpha + rng.normal(0.0, 6.0, (size, size, 3))
    if scene.gray:
        image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(image, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- conversations
def _options(rng: np.random.Generator, answer: str, pool: tuple[str, ...]) -> str:
    """The answer among 1..len(pool)-1 distractors, in random order."""
    others = [p for p in pool if p != answer]
    k = int(rng.integers(1, len(others) + 1))
    picked = [answer, *rng.choice(others, size=k, replace=False).tolist()]
    rng.shuffle(picked)
    return ", ".join(picked)


def _caption_options(rng: np.random.Generator, scene: Scene) -> str:
    """Multiple choice over whole captions: the scene's own and 1-3 captions of other random scenes."""
    own = scene.caption()
    others: list[str] = []
    for _ in range(50):
        c = random_scene(rng).caption()
        if c != own and c not in others:
            others.append(c)
        if len(others) == 3:
            break
    picked = [own, *others[: int(rng.integers(1, len(others) + 1))]]
    rng.shuffle(picked)
    return ", ".join(picked)


TASKS = ("caption", "question", "choice", "caption choice", "repeat")


def conversation(scene: Scene, rng: np.random.Generator, task: str | None = None) -> tuple[str, str, str]:
    """``(task, instruction, response)``: one conversation about ``scene``; ``task`` random unless given."""
    task = task or str(rng.choice(TASKS, p=[0.15, 0.3, 0.3, 0.15, 0.1]))
    if task == "repeat":
        word = pseudo_word(rng)
        return task, str(rng.choice(REPEAT_PROMPTS)).format(word=word), word
    if task == "caption":
        return task, str(rng.choice(CAPTION_PROMPTS)), scene.caption()
    if task == "caption choice":
        return task, str(rng.choice(MC_LEADS)).format(options=_caption_options(rng, scene)), scene.caption()
    question, answer, pool = scene.questions()[rng.integers(len(scene.questions()))]
    if task == "question":
        return task, question, answer
    return (
        task,
        f"{question} " + str(rng.choice(MC_LEADS)).format(options=_options(rng, answer, pool)),
        answer,
    )


def corpus_texts() -> list[str]:
    """Every word and phrase the corpus can produce, for training a tokenizer."""
    words = [
        *SHAPES,
        *(s + "s" for s in SHAPES),
        "crosses",
        *COLOURS,
        *GRAYS,
        *SIZES,
        *COUNTS,
        *POSITIONS,
        *ORIENTATIONS,
        *WIDTHS,
        *TEXTURES,
        *KINDS,
        "stripes",
        "soft blob",
        "soft blobs",
        "at the",
        "on a",
        "backdrop",
        *CAPTION_PROMPTS,
        *(lead.format(options="") for lead in MC_LEADS),
    ]
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(300)]
    texts = words + [s.caption() for s in scenes] + [q for s in scenes for q, _, _ in s.questions()]
    return texts + [pseudo_word(rng) for _ in range(3000)]
