"""The optional decoders: HEIC/HEIF through pillow-heif, AVIF where Pillow lacks it, camera RAW
through rawpy (LibRaw). They come with ``pip install "clipcli[photos]"``.

Nothing is imported until a file needs it: :func:`sniff` tells from a file's first bytes which
decoder it wants, :func:`heif_opener` registers pillow-heif's opener with Pillow the first time a
HEIF file is met, and :func:`raw_image` imports rawpy the first time a RAW file is. Without the
library the file fails with a reason naming the extra; the run goes on.

A RAW file is read from its embedded JPEG preview when the preview's smaller side is at least
``draft_size`` (twice the model's side: the preview is then all the model sees anyway), else it
is demosaiced (camera white balance, 8-bit sRGB; at half size when that still leaves
``draft_size`` pixels). Both come out upright: LibRaw applies the RAW's orientation when it
demosaics, and a preview follows its own EXIF orientation or, without one, the RAW's.
"""

from __future__ import annotations

import io
import threading
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import ItemError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# The decoding options are clipcli.images.DecodeOptions (not imported: images imports this module).
DecodeOptions = Any

EXTRA = 'pip install "clipcli[photos]"'
# The ``fix`` of a failure this machine causes, not the file: an index does not store it, and
# tries the file again once the decoder is there.
MISSING = "decoder"
LABELS = {"HEIF": "HEIC/HEIF", "AVIF": "AVIF", "RAW": "camera RAW"}

# ISO base media ("ftyp") brands: AVIF's, HEIF's (HEVC and the generic image brands), Canon CR3's.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                          b"mif1", b"msf1", b"mif2"})
_RAW_BRANDS = frozenset({b"crx "})
# RAW files whose first bytes say so (the TIFF-based NEF, ARW, DNG, PEF, SRW are told by their name,
# or a DNG by its DNGVersion tag once Pillow has read the TIFF header).
_RAW_MAGIC = (b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
DNG_VERSION_TAG = 50706
# LibRaw's flip (dcraw's) as an EXIF orientation, as dcraw writes it into a preview's EXIF.
_FLIP_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}

_lock = threading.Lock()
_registered: set[str] = set()


def iso_brands(head: bytes) -> list[bytes]:
    """The major and compatible brands of an ISO base media file's ``ftyp`` box (``[]`` if none)."""
    if head[4:8] != b"ftyp":
        return []
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size) if size >= 16 else len(head)
    return [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]


def sniff(head: bytes) -> str | None:
    """``"HEIF"``, ``"AVIF"`` or ``"RAW"`` when a file's first bytes say it needs that decoder."""
    brands = iso_brands(head)
    if brands:
        if brands[0] in _RAW_BRANDS:
            return "RAW"
        if _AVIF_BRANDS.intersection(brands):  # before HEIF: AVIF files list mif1 too
            return "AVIF"
        return "HEIF" if _HEIF_BRANDS.intersection(brands) else None
    if head.startswith(_RAW_MAGIC) or (head.startswith(b"II*\x00") and head[8:10] == b"CR"):  # CR2
        return "RAW"
    return None


def heif_opener() -> None:
    """Register pillow-heif's HEIF opener with Pillow (once); :class:`ItemError` without it."""
    if "HEIF" in _registered:
        return
    with _lock:
        try:
            import pillow_heif
        except (ImportError, OSError):
            raise ItemError(f"unsupported format: HEIC/HEIF (needs pillow-heif: {EXTRA})", fix=MISSING) from None
        pillow_heif.register_heif_opener()
        _registered.add("HEIF")


def avif_opener() -> None:
    """Make sure Pillow opens AVIF: its own plugin (in Pillow's wheels since 11.2), else the AVIF
    opener of a pillow-heif before 1.0; :class:`ItemError` with neither."""
    if "AVIF" in _registered:
        return
    with _lock:
        from PIL import features

        if not features.check("avif"):
            try:
                import pillow_heif
                register = pillow_heif.register_avif_opener  # pillow-heif before 1.0
            except (ImportError, OSError, AttributeError):
                raise ItemError("unsupported format: AVIF (this Pillow has no AVIF decoder: pip install -U Pillow)",
                                fix=MISSING) from None
            register()
        _registered.add("AVIF")


def load_rawpy():
    try:
        import rawpy
    except (ImportError, OSError):
        raise ItemError(f"unsupported format: camera RAW (needs rawpy: {EXTRA})", fix=MISSING) from None
    return rawpy


def _with_flip(image: "Image.Image", flip: int) -> "Image.Image":
    """``image`` (a RAW's preview) upright: by its own EXIF orientation, else by the RAW's flip."""
    from PIL import ImageOps

    exif = image.getexif()
    if 0x0112 not in exif:
        exif[0x0112] = _FLIP_ORIENTATION.get(flip, 1)
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - EXIF is advisory; the pixels are already decoded
        return image


def _preview(raw, rawpy, options: DecodeOptions) -> "Image.Image | None":
    """The RAW's embedded preview, upright and RGB, when its smaller side is at least
    ``options.draft_size`` and it decodes; ``None`` otherwise (the RAW is then demosaiced)."""
    from PIL import Image

    try:
        thumb = raw.extract_thumb()
        if thumb.format == rawpy.ThumbFormat.JPEG:
            image = Image.open(io.BytesIO(thumb.data), formats=["JPEG"])
            if min(image.size) < options.draft_size or image.width * image.height > options.max_pixels:
                return None
            image.draft("RGB", (options.draft_size, options.draft_size))
            image.load()
        else:
            pixels = thumb.data
            if pixels.dtype != "uint8" or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
                return None
            image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            if min(image.size) < options.draft_size:
                return None
        return _with_flip(image, raw.sizes.flip).convert("RGB")
    except Exception:  # noqa: BLE001 - no preview, or a broken one: demosaic instead
        return None


def raw_image(fp: BinaryIO, options: DecodeOptions, sure: bool = True) -> "Image.Image | None":
    """A camera RAW file, upright, in RGB: its preview or its demosaiced pixels (see the module).

    Without ``sure`` (a TIFF that Pillow could not read, maybe a RAW file named otherwise),
    ``None`` when LibRaw does not take it either. The pixel cap is checked from the RAW's
    header, before anything is demosaiced.
    """
    rawpy = load_rawpy()
    from PIL import Image

    try:
        with rawpy.imread(fp) as raw:
            width, height = raw.sizes.width, raw.sizes.height
            if width * height > options.max_pixels:
                raise ItemError(f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
                                f"{options.max_pixels}", fix="max_pixels")
            draft = None if options.exact else options.draft_size
            if draft and (image := _preview(raw, rawpy, options)) is not None:
                return image
            half = bool(draft) and min(width, height) // 2 >= draft
            pixels = raw.postprocess(use_camera_wb=True, output_bps=8, half_size=half)
        return Image.fromarray(pixels)
    except rawpy.LibRawError as error:
        if not sure:
            return None
        if isinstance(error, rawpy.LibRawFileUnsupportedError):
            raise ItemError("cannot decode camera RAW: LibRaw does not support this file") from None
        if isinstance(error, rawpy.LibRawTooBigError):
            raise ItemError("image too large: LibRaw refuses to allocate this RAW file") from None
        if isinstance(error, (rawpy.LibRawIOError, rawpy.LibRawDataError)):
            raise ItemError(f"truncated or damaged camera RAW file: {_text(error)}") from None
        raise ItemError(f"cannot decode camera RAW: {_text(error)}") from None


def _text(error: BaseException) -> str:
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message) or type(error).__name__


def looks_like_tiff(head: bytes) -> bool:
    return head.startswith(_TIFF_MAGIC)
