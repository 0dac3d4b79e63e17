"""Image files (PNG, JPEG, TIFF, BMP, DICOM) to the uint8 arrays of the MedMNIST layout.

One function, :func:`to_array`, takes a file's pixels to what ``vitask data import`` writes into a dataset, so
that every image on disk is preprocessed one way (docs/method.md#import):

1. **Read** to ``(H, W)`` gray or ``(H, W, 3)`` RGB uint8. 8-bit files are taken as they are. A gray file of more
   than 8 bits (16-bit PNG or TIFF) is scaled from its own minimum and maximum to 0-255. DICOM goes through
   :func:`read_dicom`: the modality LUT (Rescale Slope / Intercept), the file's first VOI window (Window Center
   / Width, DICOM's linear function) or else the image's own range, and MONOCHROME1 inverted so that dense
   tissue is bright, as a radiologist sees it.
2. **Channels.** The dataset's channel count (1 or 3) decides; an image with the other count is an error unless
   conversion is asked for (luminance ``L = 0.299 R + 0.587 G + 0.114 B`` for RGB to gray, channel copies for gray
   to RGB, PIL's conversions).
3. **Size.** Centre crop to a square on the shorter side, then one bicubic resize (PIL) to 28, 64, 128 or 224 px:
   MedMNIST's published preprocessing (bicubic resizing to the target size; a centre crop where the source is not
   square). The files a MedMNIST download gives were made with the source datasets' own crops, which are not
   published per dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitask_pl.errors import ConfigError

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUFFIXES = PICTURE_SUFFIXES + DICOM_SUFFIXES
DICOM_EXTRA = "pip install 'vitask[dicom]' (or pip install pydicom)"


def is_image(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in SUFFIXES or _has_dicom_preamble(path))


def _has_dicom_preamble(path: Path) -> bool:
    """DICOM files often have no suffix; their 128-byte preamble is followed by ``DICM``."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``[low, high]`` to 0-255, clipped; a constant image is black."""
    values = values.astype(np.float64)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.round((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR VOI function (PS3.3 C.11.2.1.2.1) to 0-255: below ``c - 0.5 - (w - 1) / 2`` black, above
    ``c - 0.5 + (w - 1) / 2`` white, linear in between."""
    values = values.astype(np.float64)
    if width <= 1:
        return np.where(values <= center - 0.5, 0, 255).astype(np.uint8)
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _first(value) -> float:
    """Window Center / Width may hold several windows; the first is the file's default."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM file's first image as a radiologist would see it, as uint8 ``(H, W)`` or ``(H, W, 3)``."""
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut
    except ImportError:
        raise ConfigError(f"{path}: a DICOM file, and pydicom is not installed; {DICOM_EXTRA}.") from None
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises InvalidDicomError, EOFError, struct and value errors for bad files
        raise ConfigError(
            f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); remove or replace it."
        ) from None
    if "PixelData" not in ds:
        what = getattr(ds, "Modality", None) or getattr(ds, "SOPClassUID", None)
        raise ConfigError(
            f"{path}: a DICOM file without pixel data ({what or 'no image'}); remove it from the images, it is not an "
            f"image."
        )
    try:
        pixels = ds.pixel_array
    except Exception as err:  # a compressed transfer syntax whose decoder is not installed, or truncated data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise ConfigError(
            f"{path}: cannot decode its pixel data ({getattr(syntax, 'name', syntax)}: {err}); install the decoder "
            f"pydicom names (e.g. pip install pylibjpeg pylibjpeg-libjpeg), or convert the file."
        ) from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ConfigError(f"{path}: a DICOM of {frames} frames; export the frame to classify as its own file.")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        return to_uint8(rgb, 0, 65535 if rgb.dtype == np.uint16 else 255)
    if pixels.ndim == 3:  # colour: pydicom returns RGB (YBR converted); 16-bit colour scaled by its range
        return pixels if pixels.dtype == np.uint8 else to_uint8(pixels, 0, 2 ** int(ds.BitsStored) - 1)
    values = apply_modality_lut(pixels, ds)  # stored values -> Hounsfield units (CT) or the modality's own
    if "WindowCenter" in ds and "WindowWidth" in ds:
        image = window(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    else:
        image = to_uint8(values, float(values.min()), float(values.max()))
    return 255 - image if photometric == "MONOCHROME1" else image  # MONOCHROME1: low values are white


def read_picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return picture_array(im, str(path))
    except ConfigError:  # the picture_array's own message (a ValueError too)
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ConfigError(
            f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace it."
        ) from None


def picture_array(im, source: str) -> np.ndarray:
    """A PIL image as uint8 gray or RGB: 8-bit gray and RGB as they are; 1, LA, P, RGBA, CMYK... through PIL's
    conversion; gray of more than 8 bits (I;16, I, F) scaled from its own minimum and maximum."""
    if im.mode in ("L", "RGB"):
        return np.asarray(im).copy()
    if not im.mode.startswith(("I", "F")):
        return np.asarray(im.convert("L" if im.mode in ("1", "LA") else "RGB")).copy()
    values = np.asarray(im)
    if values.ndim != 2:
        raise ConfigError(f"{source}: an image of shape {values.shape}; save it as 8-bit gray or RGB.")
    return to_uint8(values, float(values.min()), float(values.max()))


def read_image(path: str | Path) -> np.ndarray:
    """uint8 ``(H, W)`` (gray) or ``(H, W, 3)`` (RGB) of any supported file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such image file; check the path.")
    dicom = path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path)
    return read_dicom(path) if dicom else read_picture(path)


def channels_of(image: np.ndarray) -> int:
    return 1 if image.ndim == 2 else 3


def to_array(image: np.ndarray, size: int, channels: int, *, convert: bool = False, source: str = "") -> np.ndarray:
    """One image in the MedMNIST layout: centre crop to a square, bicubic resize to ``size``; ``(size, size)`` for
    gray, ``(size, size, 3)`` for RGB. An image of the other channel count is an error unless ``convert``."""
    from PIL import Image

    if channels_of(image) != channels and not convert:
        raise ConfigError(
            f"{source or 'image'}: {'gray' if image.ndim == 2 else 'RGB'} but the dataset is "
            f"{'gray' if channels == 1 else 'RGB'}; pass --convert true to convert it (or import it apart)."
        )
    im = Image.fromarray(image)
    if channels_of(image) != channels:
        im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).copy()
