"""``vitask classify``: a tuned VLM stage as a classifier of image files (PNG, JPEG, TIFF, DICOM, or folders).

Images take the training path: :func:`vitask_pl.data.images.read_image` and :func:`~vitask_pl.data.images.to_array`
(the import's reading, channels, centre crop and bicubic resize to the stage's image size), then the stage's own
collate (processor, chat template, candidates) and its ``score`` protocol. So the probabilities of a test split's
files are those ``vitask predict`` gives on that split. With a TSM (a VITask stage) each image is answered twice:
by the VLM alone (``wo_ep``, the deployment setting) and with the TSM's exemplar (``w_ep``); another TSM trained
on the images' dataset may be plugged in (VITask^plug), without re-tuning the VLM or the connector.

From Python (a notebook)::

    clf = Classifier.load("runs/export", dataset="aptos", root="data/external")
    rows = clf.predict(["scan1.png", "scan2.dcm"])  # [{"image", "dataset", "wo_ep": {"answer", "probs"}, ...}]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vitask_pl.atomic import overwrite_error
from vitask_pl.data.cards import read_card
from vitask_pl.data.catalog import FLAGS
from vitask_pl.data.dataset import JointDataset
from vitask_pl.data.files import Split
from vitask_pl.data.images import is_image, picture_array, read_image, to_array
from vitask_pl.errors import ConfigError, MissingFileError, UserError
from vitask_pl.eval.results import write_json, write_predictions
from vitask_pl.fingerprint import compare
from vitask_pl.modules.evaluation import answer
from vitask_pl.stages import STAGES

SOURCE = "a VLM stage checkpoint (`vitask fit`'s checkpoints/last.ckpt) or a `vitask export` folder"
OUTPUT_SUFFIXES = (".csv", ".json")


def _from_checkpoint(path: Path) -> tuple[dict, dict, dict, str | None]:
    """``(hyperparameters, fingerprint record, adapter tensors, TSM)`` of a stage checkpoint; its TSM is the path
    it was tuned with, as for `vitask test`."""
    from vitask_pl.export import read_checkpoint
    from vitask_pl.models.vitask_model import is_adapter

    checkpoint, _ = read_checkpoint(str(path), "--model")
    hp = checkpoint["hyper_parameters"]
    adapters = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter(k)}
    return hp, checkpoint["vitask"], adapters, hp.get("tsm_ckpt")


class Classifier:
    """A tuned VLM stage that answers one dataset's question about images, with class probabilities.

    Build it with :meth:`load`; :meth:`predict` takes paths (files or folders), uint8 arrays or PIL images.

    Args:
        module: a VLM stage of one dataset whose exemplar source (if any) runs the TSM on each batch: the feature
            cache is keyed by split rows, which images from elsewhere do not have.
        convert: convert an image of the other channel count (luminance, or gray copied to RGB), as the import does.
        batch_size: images per forward.
    """

    def __init__(self, module, *, convert: bool = False, batch_size: int = 16):
        source = module.model.source
        if len(module.specs) != 1 or (source is not None and source.cache is not None):
            raise ConfigError(
                "Classifier: the module must be built for one dataset with exemplar.feature_cache false (the cache "
                "is keyed by split rows); build it with Classifier.load."
            )
        self.module = module.eval()
        (self.spec,) = module.specs
        self.size = int(module.hparams["image_size"])
        self.convert, self.batch_size = convert, batch_size
        self.modes = module.modes

    @classmethod
    def load(
        cls,
        model: str | Path,
        dataset: str | None = None,
        *,
        root: str | Path = "data/medmnist",
        tsm_ckpt: str | None = None,
        ep: bool = True,
        convert: bool = False,
        batch_size: int = 16,
        device: str = "auto",
    ) -> Classifier:
        """A classifier from a stage checkpoint or an export folder.

        Args:
            model: a vanilla, ep or rda_crt stage checkpoint, or a folder written by ``vitask export``.
            dataset: what the images are: a dataset the stage was tuned on, or an imported one whose card (under
                ``root``) shares a tuned dataset's label space. Default: the stage's one dataset.
            root: where an imported dataset's card is (cards of the tuned datasets travel in the stage).
            tsm_ckpt: the TSM for ``w_ep``; default the stage's own (an export's copy, or the path a checkpoint was
                tuned with). A TSM trained on ``dataset`` itself is VITask^plug.
            ep: answer with the exemplar too (VITask stages); ``false``: the VLM alone, no TSM needed.
            convert: convert images of the other channel count instead of refusing them.
            batch_size: images per forward.
            device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:1``...
        """
        from vitask_pl.export import EXPORT_RECORD, read_export
        from vitask_pl.modules.vanilla import VanillaInstructionTuning
        from vitask_pl.modules.vitask import ExemplarPromptTuning

        where = _device(device)
        path = Path(model).expanduser()
        if (path / EXPORT_RECORD).is_file():
            hp, record, adapters, own_tsm = read_export(path)
        elif path.is_file():
            hp, record, adapters, own_tsm = _from_checkpoint(path)
        else:
            what = f"a folder without {EXPORT_RECORD}" if path.is_dir() else "not there"
            raise MissingFileError(f"--model: {model} is {what}; pass {SOURCE}.")
        trained = list(hp["datasets"])
        card = _card(dataset, trained, hp.get("cards") or {}, root)
        name = card["name"] if card else (dataset or trained[0]).lower()
        run = {"stage": record["stage"], "datasets": [name]}
        if card and card["shares"]:
            run["shares"] = {name: card["shares"]}
        compare(record, run, path=model, option="--model")

        vitask = record["stage"] != STAGES["vanilla"].class_name
        with_ep = vitask and ep
        # Inference differs between the stages only in whether a TSM answers too, so the classifier builds the one
        # it needs: stage 1's class for VITask with the exemplar (stage 2's would re-read its init_from), vanilla's
        # for the VLM alone. The adapters are loaded over it and must all fit.
        klass = ExemplarPromptTuning if with_ep else VanillaInstructionTuning
        kwargs = {**hp, "datasets": [name], "cards": {name: card} if card else None}
        options = dict(hp.get("vlm_options") or {})
        if where.type != "cuda" and options.get("attn_implementation") == "flash_attention_2":
            options["attn_implementation"] = "sdpa"  # the same attention, computed without a GPU kernel
        kwargs["vlm_options"] = options
        if with_ep:
            kwargs["tsm_ckpt"] = _tsm(tsm_ckpt or own_tsm, name, card, record, int(hp["image_size"]))
            kwargs["exemplar"] = {**(hp.get("exemplar") or {}), "feature_cache": False}  # the TSM runs on the images
        elif tsm_ckpt:
            raise ConfigError(
                f"--tsm_ckpt: {tsm_ckpt} is given but "
                f"{'--ep is false' if vitask else f'{model} is vanilla IT, which has no connector'}; drop one."
            )
        kwargs.pop("objective", None)  # training's only
        accepted = inspect.signature(klass.__init__).parameters
        try:
            module = klass(**{k: v for k, v in kwargs.items() if k in accepted})
        except UserError as err:  # the stage's own check, phrased for `vitask fit`: say where the value came from
            raise type(err)(f"--model: {model}'s stage cannot be rebuilt here: {err}") from None
        _load_adapters(module, adapters, model, vitask and not with_ep)
        module.to(where)
        return cls(module, convert=convert, batch_size=batch_size)

    def arrays(self, images: Sequence) -> tuple[list[str], np.ndarray]:
        """Names and ``(N, S, S, C)`` uint8 arrays of ``images`` (paths, folders, arrays, PIL images), as trained.
        Each file is resized as it is read, so a folder of large DICOMs never sits in memory at full size."""
        names, arrays = [], []
        for i, item in enumerate(images):
            try:
                for name, pixels in _read(item, i):
                    array = to_array(pixels, self.size, self.spec.n_channels, convert=self.convert, source=name)
                    names.append(name)
                    arrays.append(array if array.ndim == 3 else array[..., None])
            except ConfigError as err:  # the file's own message, under the option that named it
                raise ConfigError(f"--images: {err}") from None
        if not arrays:
            raise ConfigError(f"--images: {list(map(str, images))} holds no image; pass image files or folders.")
        return names, np.stack(arrays)

    @torch.no_grad()
    def predict(self, images: Sequence) -> list[dict]:
        """One row per image: ``{"image", "dataset", mode: {"answer", "probs": {class: p}}}`` for each mode."""
        from lightning.fabric.utilities.apply_func import move_data_to_device
        from torch.utils.data import DataLoader

        names, arrays = self.arrays([images] if isinstance(images, (str, Path)) else images)
        unknown = np.zeros((len(arrays), self.spec.label_width), np.int64)  # the collate renders a response; unused
        data = JointDataset([self.spec], [Split(arrays, unknown)])
        loader = DataLoader(data, batch_size=self.batch_size, collate_fn=self.module.collate)
        device = next(self.module.parameters()).device
        block = slice(self.spec.offset, self.spec.offset + self.spec.num_classes)
        rows = []
        for batch in loader:
            probs = self.module.class_probabilities(move_data_to_device(batch, device))
            for b in range(len(batch["dataset"])):
                row = {"image": names[len(rows)], "dataset": self.spec.flag}
                for mode, p in probs.items():
                    p = p[b, block].cpu()
                    row[mode] = {"answer": answer(self.spec, p), "probs": dict(zip(self.spec.labels, p.tolist()))}
                rows.append(row)
        return rows


def _card(dataset: str | None, trained: list[str], cards: dict, root) -> dict | None:
    """The card of ``dataset`` (``None`` for a MedMNIST flag): the stage's own, else read under ``root``; the
    dataset must be one the stage was tuned on or share one's label space."""
    if dataset is None:
        if len(trained) > 1:
            raise ConfigError(
                f"--dataset: the stage was tuned on {trained}; name the images' dataset, e.g. --dataset {trained[0]}."
            )
        dataset = trained[0]
    name = dataset.lower()
    card = None if name in FLAGS else cards.get(name) or read_card(root, name, "--dataset")
    if name not in trained and (card is None or card["shares"] not in trained):
        shared = f" (it shares {card['shares']})" if card and card["shares"] else ""
        raise ConfigError(
            f"--dataset: {dataset!r}{shared} is not among the stage's tuned datasets {trained}; pass one of them, or "
            f"an import that shares one's label space (`vitask data import --shares {trained[0]} ...`)."
        )
    return card


def _tsm(path: str | None, dataset: str, card: dict | None, record: dict, image_size: int) -> str:
    """The TSM for ``w_ep``, checked against what the stage's connector and the images need."""
    from vitask_pl.models.tsm import load_tsm

    if not path or not Path(path).is_file():
        raise MissingFileError(
            f"--tsm_ckpt: the stage's TSM {path or '(none recorded)'} is not there; pass --tsm_ckpt PATH (the TSM it "
            f"was tuned with, or one trained on these images' dataset: VITask^plug), or --ep false for the VLM alone."
        )
    tsm, hp = load_tsm(path, option="--tsm_ckpt")
    width, trained_on = record.get("tsm_width"), list(hp["datasets"])
    if width is not None and tsm.num_features != width:
        raise ConfigError(
            f"--tsm_ckpt: {path} gives {tsm.num_features}-wide features but the stage's connector takes {width}; "
            f"plug in a TSM of the same backbone width."
        )
    if dataset not in trained_on and (card is None or card["shares"] not in trained_on):
        raise ConfigError(
            f"--tsm_ckpt: {path} was trained on {trained_on}, not on {dataset}; pass a TSM trained on {dataset} "
            f"(or on the dataset whose label space it shares)."
        )
    if hp.get("image_size") != image_size:
        raise ConfigError(
            f"--tsm_ckpt: {path} was trained at {hp.get('image_size')} px, the stage at {image_size} px; pass a TSM "
            f"trained at {image_size} px."
        )
    return path


def _load_adapters(module, adapters: dict, source, drop_connector: bool) -> None:
    """Every adapter of ``module`` from ``adapters`` and every adapter given used (the connector may be dropped
    when the VLM answers alone), so a classifier is never silently half-trained."""
    from vitask_pl.models.vitask_model import ADAPTER_PREFIX, is_adapter

    if drop_connector:
        adapters = {k: v for k, v in adapters.items() if not k.startswith(ADAPTER_PREFIX)}
    ours = {k: v for k, v in module.state_dict().items() if is_adapter(k)}
    missing = [k for k in ours if k not in adapters]
    unused = [k for k, v in adapters.items() if k not in ours or ours[k].shape != v.shape]
    if missing or unused:
        first = f"nothing for {missing[0]}" if missing else f"{unused[0]} has no place"
        raise ConfigError(
            f"--model: {source}'s adapters do not fit the model its hyperparameters build ({first}; "
            f"{len(missing)} missing, {len(unused)} unused); export or train it again with this vitask."
        )
    module.load_state_dict(adapters, strict=False)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(
            f"--device: {device}, but this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu "
            f"or auto."
        )
    if where.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: {device!r}; use auto, cpu, cuda or cuda:N.")
    return where


def _read(item, position: int) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, uint8 pixels)`` of one input, lazily: a file, every image under a folder (sorted), an array, or a
    PIL image (read as an image file is)."""
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_dir():
            yield str(item), read_image(path)
            return
        files = sorted(p for p in path.rglob("*") if is_image(p))
        if not files:
            raise ConfigError(f"{item} holds no PNG, JPEG, TIFF, BMP or DICOM file; check the folder.")
        for file in files:
            yield str(file), read_image(file)
        return
    name = f"images[{position}]"
    if hasattr(item, "mode") and hasattr(item, "convert"):  # a PIL image
        yield name, picture_array(item, name)
        return
    pixels = np.asarray(item)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise ConfigError(
            f"{name}: an array of {pixels.dtype} {pixels.shape}; pass uint8 (H, W) gray or (H, W, 3) RGB."
        )
    yield name, pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels


def flat_rows(rows: list[dict]) -> list[dict]:
    """CSV columns: ``image``, ``dataset``, then per mode ``{mode}_answer`` and ``{mode}_p[class]``."""
    flat = []
    for row in rows:
        out = {"image": row["image"], "dataset": row["dataset"]}
        for mode, result in ((k, v) for k, v in row.items() if isinstance(v, dict)):
            out[f"{mode}_answer"] = result["answer"]
            out.update({f"{mode}_p[{c}]": round(p, 6) for c, p in result["probs"].items()})
        flat.append(out)
    return flat


def classify(
    images: list[str],
    model: str,
    dataset: str | None = None,
    out: str = "predictions.csv",
    root: str = "data/medmnist",
    tsm_ckpt: str | None = None,
    ep: bool = True,
    convert: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    force: bool = False,
) -> Path:
    """Classify image files with a tuned stage or an export: a CSV or JSON row per image.

    Each row holds the answer and the class probabilities without the TSM (``wo_ep``) and, for a VITask stage,
    with its exemplar (``w_ep``).

    Args:
        images: image files and folders (PNG, JPEG, TIFF, BMP, DICOM; folders are read recursively), e.g.
            ``--images '[scans/, extra.dcm]'``.
        model: a vanilla, ep or rda_crt stage checkpoint, or a folder written by ``vitask export``.
        dataset: the images' dataset: a tuned flag, or an imported card under ``--root`` that shares its label
            space. Default: the stage's one dataset.
        out: ``.csv`` (a column per class and mode) or ``.json`` (a list of rows).
        root: folder of imported datasets' cards.
        tsm_ckpt: the TSM for ``w_ep`` (default: the stage's own); one trained on ``dataset`` is VITask^plug.
        ep: also answer with the exemplar (VITask stages); ``false``: the VLM alone.
        convert: convert images of the other channel count instead of refusing them.
        batch_size: images per forward.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        force: replace ``--out`` if it exists.

    Returns:
        The file written.
    """

    target = Path(out).expanduser()
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out: {out} is neither .csv nor .json; name the file predictions.csv or .json.")
    if target.exists() and not force:
        raise overwrite_error(target)
    clf = Classifier.load(
        model,
        dataset,
        root=root,
        tsm_ckpt=tsm_ckpt,
        ep=ep,
        convert=convert,
        batch_size=batch_size,
        device=device,
    )
    rows = clf.predict([images] if isinstance(images, str) else images)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".json":
        write_json(target, rows)
    else:
        write_predictions(target, flat_rows(rows))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[clf.modes[0]]["answer"]] = counts.get(row[clf.modes[0]]["answer"], 0) + 1
    summary = ", ".join(f"{a} {n}" for a, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"classify: {len(rows)} images of {clf.spec.flag} ({', '.join(clf.modes)}) -> {target}; {summary}")
    return target
