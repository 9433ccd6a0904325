"""Decoding images: one :class:`~clipcli.items.Item` -> an upright ``PIL.Image``, RGB by default.

Decoding is deliberately narrow: only the formats in :data:`IMAGE_FORMATS` are opened
(Pillow's ``formats=``), the pixel count is checked from the header before any pixel is
decoded, and every exception a decoder raises on malformed data becomes a reason string
(:class:`~clipcli.errors.ItemError`). HEIC/HEIF, AVIF and camera RAW go through the optional
decoders of :mod:`clipcli.decoders`. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import codecs
import errno
import functools
import io
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator

from . import decoders
from .errors import ItemError, Reason
from .http import FetchOptions, fetch_url
from .items import RAW_EXTENSIONS, Item

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


# The formats we open: Pillow's names (the JPEG opener also yields MPO, as many camera JPEGs are;
# PPM covers PBM, PGM, PPM and PNM), then those of the optional decoders: HEIF (pillow-heif's
# opener), AVIF (Pillow's own where it has it) and RAW (rawpy, not a Pillow format).
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "ICO")
IMAGE_FORMATS = (*PILLOW_FORMATS, "HEIF", "AVIF", "RAW")
# Pillow's own default cap (about 89 megapixels).
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
# A decoder stuck longer than this on one file (a hostile file, a hung network mount) is left
# behind and the file fails: a 100-megapixel RAW demosaics in a few seconds here.
DECODE_TIMEOUT = 60.0



@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded: the pixel cap checked from the header, whether a truncated
    file is scored from what could be decoded, and reduced-size JPEG decoding.

    With ``draft_size`` (and not ``exact``), a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that still leaves both sides at least ``draft_size`` pixels; the exact
    bicubic resize then runs on that. The pipeline sets it to twice the model's resolution.

    ``exact`` (``--exact-decode``) decodes at full size and leaves the image in the file's own
    mode (P, RGBA, LA, L, 1, I;16, CMYK, ...), so that the transform (``Preprocess`` or
    ``image_transform``) resizes it in that mode and converts it to RGB after the crop, exactly
    as OpenAI's and OpenCLIP's transforms do with ``Image.open(path)``: Pillow resizes P and 1
    images with nearest neighbour whatever is asked, ``convert("RGB")`` drops alpha (transparent
    pixels show their stored colour, often black) and clips 16-bit values above 255. By default
    the image is converted first, by :func:`to_rgb`: alpha composited on white, 16-bit grey
    scaled to 8 bits, an embedded colour profile applied (to sRGB), then the bicubic resize runs
    on RGB. Both paths apply the EXIF orientation, which the reference transforms do not (nor
    colour profiles).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False
    formats: tuple[str, ...] = IMAGE_FORMATS
    exact: bool = False
    draft_size: int | None = None
    timeout: float | None = DECODE_TIMEOUT  # seconds a worker may take on one item (clipcli.batching)


@contextmanager
def pillow_limits(options: DecodeOptions) -> Iterator[None]:
    """Set Pillow's process-wide knobs for one run and restore them afterwards.

    Pillow reads its truncation flag and bomb limit from module globals; our own pixel
    check (made from the header, before decoding) is the one that reports, so Pillow's
    warning is silenced and its hard limit raised to at least ours.
    """
    import warnings

    from PIL import Image, ImageFile

    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    Image.MAX_IMAGE_PIXELS = max(options.max_pixels, DEFAULT_MAX_PIXELS)
    ImageFile.LOAD_TRUNCATED_IMAGES = options.allow_truncated
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


# Magic numbers of formats we do not open, so the reason can say what the file is.
_FOREIGN_MAGIC = (
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"SIMPLE  =", "FITS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000"),
    (b"\xff\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"\x89HDF", "HDF5"),
)
_SUPPORTED = "JPEG, PNG, WebP, BMP, GIF, TIFF, PNM, ICO, HEIC/HEIF, AVIF, camera RAW"


def _why_unidentified(head: bytes, content_type: str | None) -> str:
    if kind := decoders.sniff(head):  # its decoder is there (checked before opening): the file is bad
        return f"cannot decode: malformed or truncated {decoders.LABELS[kind]} file"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return f"unsupported format: ISO media ({brand.decode('latin-1').strip()!r}), not an image we open"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        from PIL import features

        if not features.check("webp"):
            return "WebP decoder missing: this Pillow was built without libwebp"
        return "cannot decode: malformed WebP file"
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            return f"unsupported format: {name} (clipcli opens only {_SUPPORTED})"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or content_type == "text/html":
        return "not an image: an HTML page" + (f" (server sent {content_type})" if content_type else "")
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "unsupported format: SVG (vector graphics; render it to PNG first)"
    if b"\x00" not in head:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # may end mid-character
            return "not an image: a text file"
        except UnicodeDecodeError:
            pass
    return f"not a recognised image (clipcli opens {_SUPPORTED})"


def _reason(error: BaseException, allow_truncated: bool, kind: str | None = None) -> Reason:
    """The reason for what a decoder raised; ``kind`` names an optional decoder's format (its
    files are never decoded in part, so no remedy is offered for a truncated one)."""
    from PIL import Image

    message = (str(error) or type(error).__name__).strip().splitlines()[0]
    if isinstance(error, Image.DecompressionBombError):
        return Reason(f"image too large: {message}", fix="max_pixels")
    if isinstance(error, MemoryError):
        return Reason("out of memory while decoding")
    lowered = message.lower()
    if "truncated" in lowered or "broken data stream" in lowered or "end of file" in lowered:
        if kind:
            return Reason(f"truncated {decoders.LABELS[kind]} file: {message}")
        return Reason(f"truncated image: {message}", fix=None if allow_truncated else "allow_truncated")
    what = f"cannot decode {decoders.LABELS[kind]}" if kind else "cannot decode"
    return Reason(f"{what}: {message}" if isinstance(error, OSError) else f"{what} ({type(error).__name__}): {message}")


@functools.lru_cache(maxsize=16)
def _srgb_transform(profile: bytes, mode: str):
    """LittleCMS's transform (Pillow's ImageCms) from an embedded ICC ``profile`` to sRGB for
    ``mode`` (RGB or CMYK) images; None for an sRGB profile (nothing to do) or one that cannot be
    used (damaged, or for another colour space than the pixels')."""
    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if mode == "RGB" and ImageCms.getProfileDescription(source).strip().lower().startswith("srgb"):
            return None
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, "RGB",
                                       renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _profiled(image: "Image.Image") -> bool:
    """Whether ``image`` has an embedded colour profile that :func:`to_rgb` applies."""
    profile = image.info.get("icc_profile")
    return (image.mode in ("RGB", "CMYK") and isinstance(profile, bytes) and bool(profile)
            and _srgb_transform(profile, image.mode) is not None)


def _kept_info(image: "Image.Image", source: "Image.Image") -> "Image.Image":
    """``image`` (made from ``source``) with ``source``'s info and EXIF: profile and orientation."""
    image.info.update(source.info)
    try:
        image.getexif().update(source.getexif())
    except Exception:  # noqa: BLE001 - EXIF is advisory: a malformed block leaves the image as stored
        pass
    return image


def _in_srgb(image: "Image.Image") -> "Image.Image | None":
    """An RGB or CMYK image with an embedded colour profile, converted to sRGB by it; None for
    one without (or with an sRGB or unusable profile). A large image is reduced first when
    decoded for a model (see :func:`decode_image`): 12 megapixels take 0.2 s to transform."""
    if not _profiled(image):
        return None
    transform = _srgb_transform(image.info["icc_profile"], image.mode)
    from PIL import ImageCms

    try:
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def to_rgb(image: "Image.Image") -> "Image.Image":
    """``image`` in RGB (the image itself when it already is), from any Pillow mode: the default
    decoding, before any resize.

    An RGB or CMYK image with an embedded ICC profile (Adobe RGB, Display P3, a printer's CMYK)
    is converted to sRGB by it, as a colour-managed viewer shows it (perceptual intent); without
    one, CMYK is Pillow's conversion (ink subtracted from white).

    Transparency (an alpha band, or the ``transparency`` of a palette or greyscale image; an RGB
    image's transparent colour is ignored) is composited on white, so that a transparent logo is
    seen on white as a viewer shows it, not on whatever colour its transparent pixels store; 16-
    and 32-bit greyscale is scaled to 8 bits (not clipped to white); everything else uses
    Pillow's conversion. The reference transforms convert after resizing and drop alpha instead;
    ``DecodeOptions(exact=True)`` skips this function to match them.
    """
    from PIL import Image

    if (managed := _in_srgb(image)) is not None:
        return managed
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _scaled_grey(image).convert("RGB")
    if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _scaled_grey(image: "Image.Image") -> "Image.Image":
    """Mode I;16/I/F to mode L: 16-bit ranges divide by 257; other ranges are stretched."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif image.mode == "I" and low >= 0 and high <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _upright(image: "Image.Image") -> "Image.Image":
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - EXIF is advisory; the pixels are already decoded
        return image


def _extension(name: str | None) -> str:
    base = (name or "").partition("?")[0].rpartition("/")[2]
    return "." + base.rpartition(".")[2].lower() if "." in base.lstrip(".") else ""


def _open(fp: BinaryIO, options: DecodeOptions, head: bytes, kind: str | None, content_type: str | None,
          try_raw: bool) -> "tuple[Image.Image, bool]":
    """``(image, decoded)``: Pillow's image of ``fp``, header read and size checked, not yet
    decoded; or, with ``try_raw``, the decoded RAW of a TIFF-based RAW file that only its bytes
    tell apart (a DNG whatever its name, a RAW file named otherwise)."""
    from PIL import Image, UnidentifiedImageError

    if kind == "HEIF":
        decoders.heif_opener()
    elif kind == "AVIF":
        decoders.avif_opener()
    formats = [name for name in options.formats if name not in decoders.LABELS or name == kind]
    try:
        image = Image.open(fp, formats=formats)
    except UnidentifiedImageError:
        fp.seek(0)
        if try_raw and (raw := decoders.raw_image(fp, options, sure=False)) is not None:
            return raw, True
        raise ItemError(_why_unidentified(head, content_type)) from None
    if try_raw and image.format == "TIFF" and decoders.DNG_VERSION_TAG in image.tag_v2:
        fp.seek(0)
        return decoders.raw_image(fp, options), True
    width, height = image.size
    if width * height > options.max_pixels:
        raise ItemError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{options.max_pixels}", fix="max_pixels"
        )
    return image, False


def decode_image(fp: BinaryIO, options: DecodeOptions = DecodeOptions(), content_type: str | None = None,
                 name: str | None = None) -> "Image.Image":
    """Decode the first frame (page, or the largest icon) of an image file object into an upright
    image: RGB (:func:`to_rgb`), or in the file's own mode with ``options.exact`` (the transform
    converts it after resizing, as the reference does). A camera RAW file is always RGB.

    The file's first bytes choose the decoder; ``name`` (the file's name or URL) tells the
    TIFF-based RAW formats (NEF, ARW, ...) by their extension. Raises :class:`ItemError` with a
    specific reason for any malformed, unsupported, truncated or oversized input, or a missing
    optional decoder; nothing a decoder raises on bad data escapes.
    """
    from PIL import Image

    head = fp.read(256)
    fp.seek(0)
    if not head:
        raise ItemError("empty file (0 bytes)")
    kind = decoders.sniff(head)
    if kind is not None and kind not in options.formats:
        raise ItemError(f"unsupported format: {decoders.LABELS[kind]} (not among the formats opened here: "
                        f"{', '.join(options.formats)})")
    tiff = decoders.looks_like_tiff(head)
    try:
        # A TIFF named like a RAW file is one (NEF, ARW, DNG, ...); a RAW file named otherwise is
        # tried when Pillow cannot read it; a JPEG or a text file named .cr2 is read as what it is.
        if kind == "RAW" or (kind is None and tiff and "RAW" in options.formats
                             and _extension(name) in RAW_EXTENSIONS):
            return decoders.raw_image(fp, options)
        image, decoded = _open(fp, options, head, kind, content_type, try_raw=tiff and "RAW" in options.formats)
        if decoded:
            return image
        if options.draft_size and not options.exact and image.format == "JPEG":
            image.draft(image.mode, (options.draft_size, options.draft_size))
        image.load()
        if image.format == "PPM" and image.mode == "I" and not options.exact:
            image = image.convert("I;16")  # Pillow scales any maximum above 255 to 65535: 16-bit
        if options.draft_size and not options.exact and _profiled(image):
            factor = min(image.size) // options.draft_size  # the colour transform on what the model sees
            image = _kept_info(image.reduce(factor), image) if factor >= 2 else image
        image = _upright(image)
        return image if options.exact else to_rgb(image)
    except ItemError:
        raise
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, MemoryError, NotImplementedError,
            OverflowError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError, RuntimeError) as error:
        raise ItemError(_reason(error, options.allow_truncated, kind)) from None
    except Exception as error:  # noqa: BLE001 - one bad file must never end the run
        raise ItemError(f"cannot decode (unexpected {type(error).__name__}): {error}") from None


def _local_failure(path: str, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(error, FileNotFoundError):
        return "dangling symlink (target missing)" if os.path.islink(path) else "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot read: {error.strerror or error}"


def read_image(item: Item, decode: DecodeOptions = DecodeOptions(), fetch: FetchOptions = FetchOptions()) -> "Image.Image":
    """The item's image, upright (RGB unless ``decode.exact``; see :func:`decode_image`), or
    :class:`ItemError` with the reason."""
    if item.error:
        raise ItemError(item.error)
    if item.data is not None:
        return decode_image(io.BytesIO(item.data), decode, name=item.name)
    if item.url is not None:
        data, content_type = fetch_url(item.url, fetch)
        return decode_image(io.BytesIO(data), decode, content_type, name=item.url)
    path = item.path
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ItemError("is a folder")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise ItemError("not a regular file")
        if info.st_size == 0:
            raise ItemError("empty file (0 bytes)")
        if item.frame is not None:
            from .video import read_frame

            image = read_frame(path, item.frame, decode)
            return image if decode.exact else to_rgb(image)
        with open(path, "rb") as f:
            return decode_image(f, decode, name=path)
    except OSError as error:
        raise ItemError(_local_failure(path, error)) from None
