"""The formats of photo libraries (issue 24): HEIC/HEIF, AVIF, camera RAW (DNG), multi-page
16-bit and CMYK TIFF, BMP, PNM, ICO, animated GIF/WebP/APNG, and RAW+JPEG pairs.

Every file is made here by the libraries' own writers (pillow-heif, Pillow, tifffile, pidng; a
DNG with an embedded preview by the small TIFF writer below). Each format's embedding equals
the one of the same decoded pixels given as a PNG (to 1e-6); the decoded pixels are checked
against the source: exactly for lossless formats, by their mean absolute difference for lossy
ones (HEIC, AVIF, JPEG previews).
"""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from typer.testing import CliRunner

from clipcli import decoders
from clipcli.batching import embed_images, image_step
from clipcli.cli import app
from clipcli.errors import ItemError
from clipcli.images import PILLOW_FORMATS, DecodeOptions, read_image
from clipcli.items import Item, expand_inputs, raw_pairs

pillow_heif = pytest.importorskip("pillow_heif")
rawpy = pytest.importorskip("rawpy")

DATA = Path(__file__).parent / "data"
EXTRA = 'pip install "clipcli[photos]"'


def decode(path: Path, **options) -> Image.Image:
    return read_image(Item(name=str(path), path=str(path)), DecodeOptions(**options))


def reason(path: Path, **options) -> str:
    with pytest.raises(ItemError) as caught:
        decode(path, **options)
    return caught.value.reason


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def mad(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference, in 8-bit levels."""
    assert a.size == b.size
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.fixture(scope="module")
def source() -> Image.Image:
    """A photo, not square (a 90-degree turn shows in its size), without the Adobe RGB profile of
    the file it comes from (which HEIF and AVIF writers would carry, and JPEG's would not)."""
    image = Image.open(DATA / "rocket.jpg").convert("RGB").resize((240, 160), Image.Resampling.BICUBIC)
    image.info.pop("icc_profile", None)
    return image


def exif(orientation: int) -> bytes:
    data = Image.Exif()
    data[0x0112] = orientation
    return data.tobytes()


def save(image: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    image.save(path, fmt, **kwargs)
    return path


# --------------------------------------------------------------------------- HEIC and AVIF


def heif_file(source: Image.Image, path: Path, fmt: str, orientation: int = 1) -> Path:
    if fmt == "HEIF":
        pillow_heif.register_heif_opener()  # its writer
    return save(source, path, fmt, quality=90, exif=exif(orientation))


@pytest.mark.parametrize("fmt, suffix", [("HEIF", "heic"), ("AVIF", "avif")])
def test_heic_and_avif_are_upright_like_the_same_jpeg(tmp_path, source, fmt, suffix):
    jpeg = decode(save(source, tmp_path / "photo.jpg", "JPEG", quality=95, exif=exif(6)))
    image = decode(heif_file(source, tmp_path / f"photo.{suffix}", fmt, orientation=6))
    assert image.mode == "RGB" and image.size == jpeg.size == (160, 240)
    upright = source.transpose(Image.Transpose.ROTATE_270)  # orientation 6: turned clockwise
    # Quality 90: 1.3 (HEIC) and 2.0 (AVIF) levels on average here; the wrong turn is 33 off.
    assert mad(image, upright) < 3.0
    assert mad(image, jpeg) < 3.0
    assert mad(image, source.transpose(Image.Transpose.ROTATE_90)) > 20


def test_a_truncated_heic_and_a_text_file_named_heic_fail_with_their_reason(tmp_path, source):
    data = heif_file(source, tmp_path / "whole.heic", "HEIF").read_bytes()
    (tmp_path / "cut.heic").write_bytes(data[: len(data) // 2])
    cut = reason(tmp_path / "cut.heic")
    assert cut.startswith("truncated HEIC/HEIF file") and cut.fix is None, cut
    (tmp_path / "notes.heic").write_text("these are my holiday notes\n")
    assert reason(tmp_path / "notes.heic") == "not an image: a text file"
    (tmp_path / "fake.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40)
    assert reason(tmp_path / "fake.heic") == "cannot decode: malformed or truncated HEIC/HEIF file"
    avif = heif_file(source, tmp_path / "whole.avif", "AVIF").read_bytes()
    (tmp_path / "cut.avif").write_bytes(avif[: len(avif) // 2])
    assert "AVIF" in reason(tmp_path / "cut.avif")


def test_the_pixel_cap_is_checked_on_heic_before_decoding(tmp_path, source):
    path = heif_file(source, tmp_path / "photo.heic", "HEIF")
    assert reason(path, max_pixels=1000) == "image too large: 240x160 = 38400 pixels exceeds the limit of 1000"
    assert reason(path, formats=PILLOW_FORMATS).startswith("unsupported format: HEIC/HEIF (not among")


def test_missing_libraries_are_named_with_the_extra(tmp_path, source, monkeypatch):
    heic = heif_file(source, tmp_path / "photo.heic", "HEIF")
    dng = tmp_path / "photo.dng"
    dng.write_bytes(dng_bytes(mosaic(64, 96), Image.new("RGB", (8, 8))))
    monkeypatch.setattr(decoders, "_registered", set())
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails
    monkeypatch.setitem(sys.modules, "rawpy", None)
    assert reason(heic) == f"unsupported format: HEIC/HEIF (needs pillow-heif: {EXTRA})"
    assert reason(dng) == f"unsupported format: camera RAW (needs rawpy: {EXTRA})"
    avif = heif_file(source, tmp_path / "photo.avif", "AVIF")
    monkeypatch.setattr(features, "check", lambda name: name != "avif")  # a Pillow without AVIF
    assert reason(avif) == "unsupported format: AVIF (this Pillow has no AVIF decoder: pip install -U Pillow)"


# --------------------------------------------------------------------------- TIFF


def test_a_multipage_16bit_tiff_is_its_first_page_scaled_not_clipped(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    ramp = np.linspace(0, 65535, 48 * 32, dtype=np.float64).reshape(32, 48)
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 30000)], axis=-1).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", np.stack([rgb, 65535 - rgb]), photometric="rgb")
    image = decode(tmp_path / "rgb16.tif")
    assert image.mode == "RGB" and image.size == (48, 32)
    # Pillow keeps the high byte of a 16-bit RGB sample: within one level of value / 257.
    assert np.abs(pixels(image) - rgb / 257.0).max() <= 1.0
    grey = ramp.astype(np.uint16)
    tifffile.imwrite(tmp_path / "grey16.tif", np.stack([grey, 65535 - grey]), photometric="minisblack")
    image = decode(tmp_path / "grey16.tif")
    expected = np.rint(grey / 257.0)
    assert (pixels(image) == expected[..., None]).all()  # first page, 30000 -> 117, never 255


def cmyk_ramp() -> Image.Image:
    x = np.linspace(0, 255, 64)
    cmyk = np.stack(np.broadcast_arrays(x[None, :], x[::-1, None], np.full((64, 64), 40.0), x[None, :] / 4), -1)
    return Image.fromarray(np.rint(cmyk).astype(np.uint8), "CMYK")


def naive_rgb(cmyk: Image.Image) -> np.ndarray:
    c, m, y, k = np.moveaxis(np.asarray(cmyk, dtype=np.float64), -1, 0)
    return np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1) / 255


def test_cmyk_tiff_and_jpeg_are_converted_to_rgb(tmp_path):
    cmyk = cmyk_ramp()
    expected = naive_rgb(cmyk)
    tiff = decode(save(cmyk, tmp_path / "cmyk.tif", "TIFF"))
    assert tiff.mode == "RGB" and np.abs(pixels(tiff) - expected).max() <= 1.0
    jpeg = decode(save(cmyk, tmp_path / "cmyk.jpg", "JPEG", quality=95))  # Adobe's inverted CMYK
    assert np.abs(pixels(jpeg) - expected).mean() < 1.0  # quality 95: 0.25 levels here


# --------------------------------------------------------------------------- BMP, PNM, ICO, first frames


def frames() -> list[Image.Image]:
    first = Image.new("RGB", (40, 30), (200, 30, 30))
    first.paste((20, 200, 40), (0, 0, 20, 15))
    return [first, Image.new("RGB", (40, 30), (10, 10, 220))]


def lossless_files(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (file, the RGB pixels it must decode to)."""
    first, second = frames()
    grey = first.convert("L")
    bits = first.convert("1")
    pgm16 = np.arange(40 * 30).reshape(30, 40) * 50
    (folder / "deep.pgm").write_bytes(b"P5\n40 30\n65535\n" + pgm16.astype(">u2").tobytes())
    icon = Image.new("RGB", (64, 64), (250, 200, 0))
    icon.paste((0, 90, 200), (0, 0, 32, 32))
    files = {
        "bmp": (save(first, folder / "photo.bmp", "BMP"), pixels(first)),
        "ppm": (save(first, folder / "photo.ppm", "PPM"), pixels(first)),
        "pgm": (save(grey, folder / "grey.pgm", "PPM"), pixels(grey)),
        "pbm": (save(bits, folder / "bits.pbm", "PPM"), pixels(bits)),
        "pgm16": (folder / "deep.pgm", np.repeat(np.rint(pgm16 / 257.0)[..., None], 3, -1)),
        "ico": (save(icon, folder / "icon.ico", "ICO", sizes=[(16, 16), (32, 32), (64, 64)]), pixels(icon)),
        "gif": (save(first, folder / "anim.gif", "GIF", save_all=True, append_images=[second], duration=100),
                pixels(first)),
        "webp": (save(first, folder / "anim.webp", "WEBP", save_all=True, append_images=[second], lossless=True),
                 pixels(first)),
        "apng": (save(first, folder / "anim.png", "PNG", save_all=True, append_images=[second]), pixels(first)),
    }
    return files


def test_bmp_pnm_ico_and_first_frames_decode_exactly(tmp_path):
    for name, (path, expected) in lossless_files(tmp_path).items():
        image = decode(path)
        assert image.mode == "RGB", name
        assert (pixels(image) == expected).all(), name


# --------------------------------------------------------------------------- camera RAW (DNG)

_TIFF_TYPES = {"B": (1, "B"), "A": (2, "s"), "H": (3, "H"), "I": (4, "I"), "R": (5, "I"), "SR": (10, "i")}


def _ifd(entries: dict, at: int) -> bytes:
    """A little-endian TIFF IFD written at offset ``at``, its long values after it; ``entries``:
    tag -> (type, values), rationals as flat numerator, denominator lists."""
    extra_at = at + 2 + 12 * len(entries) + 4
    body, extra = b"", b""
    for tag, (kind, values) in sorted(entries.items()):
        code, fmt = _TIFF_TYPES[kind]
        if kind == "A":
            data, count = values.encode() + b"\0", len(values) + 1
        else:
            data = struct.pack(f"<{len(values)}{fmt}", *values)
            count = len(values) // 2 if kind in ("R", "SR") else len(values)
        field = data.ljust(4, b"\0") if len(data) <= 4 else struct.pack("<I", extra_at + len(extra))
        extra += b"" if len(data) <= 4 else data + b"\0" * (len(data) % 2)
        body += struct.pack("<HHI", tag, code, count) + field
    return struct.pack("<H", len(entries)) + body + struct.pack("<I", 0) + extra


def dng_bytes(cfa: np.ndarray, preview: Image.Image | bytes, orientation: int = 1) -> bytes:
    """A DNG as cameras write them: IFD0 the preview (a JPEG's bytes, or uncompressed RGB), its
    SubIFD the 16-bit RGGB mosaic ``cfa`` (white level 4095, identity colour matrix)."""
    if isinstance(preview, bytes):
        (width, height), strip, compression, photometric = Image.open(io.BytesIO(preview)).size, preview, 7, 6
    else:
        (width, height), strip, compression, photometric = preview.size, preview.tobytes(), 1, 2
    raw = cfa.astype("<u2").tobytes()
    rows, cols = cfa.shape

    def ifd0(sub_at: int, strip_at: int) -> dict:
        return {254: ("I", [1]), 256: ("I", [width]), 257: ("I", [height]), 258: ("H", [8, 8, 8]),
                259: ("H", [compression]), 262: ("H", [photometric]), 271: ("A", "Test"), 272: ("A", "Cam"),
                273: ("I", [strip_at]), 274: ("H", [orientation]), 277: ("H", [3]), 278: ("I", [height]),
                279: ("I", [len(strip)]), 330: ("I", [sub_at]), 50706: ("B", [1, 4, 0, 0]),
                50707: ("B", [1, 1, 0, 0]), 50708: ("A", "Test Cam"),
                50721: ("SR", [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]),
                50728: ("R", [1, 1, 1, 1, 1, 1]), 50778: ("H", [21])}

    def sub(raw_at: int) -> dict:
        return {254: ("I", [0]), 256: ("I", [cols]), 257: ("I", [rows]), 258: ("H", [16]), 259: ("H", [1]),
                262: ("H", [32803]), 273: ("I", [raw_at]), 277: ("H", [1]), 278: ("I", [rows]),
                279: ("I", [len(raw)]), 33421: ("H", [2, 2]), 33422: ("B", [0, 1, 1, 2]),
                50714: ("H", [0]), 50717: ("H", [4095])}

    sub_at = 8 + len(_ifd(ifd0(0, 0), 8))
    strip_at = sub_at + len(_ifd(sub(0), sub_at))
    raw_at = strip_at + len(strip) + len(strip) % 2
    header = b"II*\0" + struct.pack("<I", 8) + _ifd(ifd0(sub_at, strip_at), 8) + _ifd(sub(raw_at), sub_at)
    return header + strip + b"\0" * (len(strip) % 2) + raw


def mosaic(rows: int, cols: int) -> np.ndarray:
    """A grey scene with a bright top-left quadrant, as a 12-bit Bayer mosaic."""
    cfa = np.full((rows, cols), 300, np.uint16)
    cfa[: rows // 2, : cols // 2] = 3800
    return cfa


def scene_preview(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (60, 60, 60))
    image.paste((250, 250, 250), (0, 0, size[0] // 2, size[1] // 2))
    return image


def bright_corner(image: Image.Image) -> int:
    """Which quadrant is brightest: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    a = pixels(image).mean(-1)
    h, w = a.shape
    return int(np.argmax([a[: h // 2, : w // 2].mean(), a[: h // 2, w // 2:].mean(),
                          a[h // 2:, : w // 2].mean(), a[h // 2:, w // 2:].mean()]))


def pidng_file(path: Path, cfa: np.ndarray, orientation: int) -> Path:
    pytest.importorskip("pidng")
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, PhotometricInterpretation

    tags = DNGTags()
    rows, cols = cfa.shape
    for tag, value in [(Tag.ImageWidth, cols), (Tag.ImageLength, rows), (Tag.TileWidth, cols), (Tag.TileLength, rows),
                       (Tag.Orientation, orientation), (Tag.PhotometricInterpretation,
                                                        PhotometricInterpretation.Color_Filter_Array),
                       (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 16), (Tag.CFARepeatPatternDim, [2, 2]),
                       (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0), (Tag.WhiteLevel, 4095),
                       (Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]]),
                       (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
                       (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]), (Tag.Make, "Test"), (Tag.Model, "Cam"),
                       (Tag.DNGVersion, DNGVersion.V1_4), (Tag.DNGBackwardVersion, DNGVersion.V1_2)]:
        tags.set(tag, value)
    writer = RAW2DNG()
    writer.options(tags, path=str(path.parent), compress=False)
    writer.convert(cfa, filename=path.stem)
    return path


def test_a_dng_without_preview_is_demosaiced_upright(tmp_path):
    path = pidng_file(tmp_path / "shot.dng", mosaic(128, 192), orientation=6)
    full = decode(path)
    with rawpy.imread(str(path)) as raw:
        reference = raw.postprocess(use_camera_wb=True, output_bps=8)
        half = raw.postprocess(use_camera_wb=True, output_bps=8, half_size=True)
    assert full.mode == "RGB" and full.size == (128, 192) and (np.asarray(full) == reference).all()
    assert (np.asarray(decode(path, exact=True, draft_size=64)) == reference).all()  # exact: never a draft
    assert bright_corner(full) == 1  # the top-left quadrant, turned clockwise
    # Twice a 32-pixel model's side is 64: half size (64 x 96) still leaves that many pixels.
    drafted = decode(path, draft_size=64)
    assert drafted.size == (64, 96) and (np.asarray(drafted) == half).all()
    assert decode(path, draft_size=65).size == (128, 192)


def test_a_dng_preview_is_used_when_twice_the_models_side(tmp_path):
    preview = scene_preview((120, 80))
    buffer = io.BytesIO()
    preview.save(buffer, "JPEG", quality=95)
    path = tmp_path / "shot.dng"
    path.write_bytes(dng_bytes(mosaic(128, 192), buffer.getvalue(), orientation=6))
    image = decode(path, draft_size=80)
    assert image.size == (80, 120)  # the preview, turned by the RAW's orientation
    assert mad(image, preview.transpose(Image.Transpose.ROTATE_270)) < 1.0  # flat JPEG at quality 95
    assert decode(path, draft_size=81).size == (128, 192)  # too small: demosaiced (64 is not half of 81)
    assert decode(path).size == (128, 192)  # no draft size: the full demosaic


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["bitmap", "jpeg with its own EXIF"])
def test_raw_previews_turn_like_the_demosaiced_raw(tmp_path, orientation, kind):
    preview = scene_preview((96, 64))
    if kind == "bitmap":
        stored: Image.Image | bytes = preview
    else:  # an EXIF block without orientation, first in the file: LibRaw keeps it, the RAW's flip applies
        buffer = io.BytesIO()
        preview.save(buffer, "JPEG", quality=95, exif=Image.Exif().tobytes())
        data = buffer.getvalue()
        assert data[2:4] == b"\xff\xe0"
        stored = data[:2] + data[4 + int.from_bytes(data[4:6], "big"):]  # without the JFIF segment
    path = tmp_path / "shot.dng"
    path.write_bytes(dng_bytes(mosaic(128, 192), stored, orientation=orientation))
    shown, demosaiced = decode(path, draft_size=64), decode(path)
    assert shown.size == (demosaiced.width // 2, demosaiced.height // 2)
    assert bright_corner(shown) == bright_corner(demosaiced)


class _Spy:
    """rawpy's RawPy, counting the demosaicing calls."""

    calls: list = []

    def __init__(self, raw):
        self.raw = raw

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def postprocess(self, **kwargs):
        self.calls.append(kwargs)
        return self.raw.postprocess(**kwargs)


def test_raw_pixel_cap_is_checked_before_demosaicing(tmp_path, monkeypatch):
    path = tmp_path / "shot.dng"
    path.write_bytes(dng_bytes(mosaic(64, 96), Image.new("RGB", (8, 8))))
    real = rawpy.imread
    monkeypatch.setattr(rawpy, "imread", lambda source: _Spy(real(source)))
    _Spy.calls = []
    assert reason(path, max_pixels=6000) == "image too large: 96x64 = 6144 pixels exceeds the limit of 6000"
    assert _Spy.calls == []
    decode(path)
    assert _Spy.calls == [{"use_camera_wb": True, "output_bps": 8, "half_size": False}]


def test_raw_from_bytes_and_misnamed_raw_files(tmp_path):
    data = dng_bytes(mosaic(64, 96), Image.new("RGB", (8, 8)))
    (tmp_path / "shot.dng").write_bytes(data)
    expected = np.asarray(decode(tmp_path / "shot.dng"))
    for item in (Item(name="shard.tar/0001.dng", data=data), Item(name="upload", data=data)):
        assert (np.asarray(read_image(item)) == expected).all(), item.name
    (tmp_path / "renamed.tif").write_bytes(data)  # a DNG is a TIFF: its DNGVersion tag tells it apart
    assert (np.asarray(decode(tmp_path / "renamed.tif")) == expected).all()
    jpeg = save(scene_preview((32, 24)), tmp_path / "really-a-jpeg.nef", "JPEG")
    assert decode(jpeg).size == (32, 24)
    (tmp_path / "notes.cr2").write_text("not a raw file\n")
    assert reason(tmp_path / "notes.cr2") == "not an image: a text file"
    (tmp_path / "cut.dng").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / "cut.dng").startswith("truncated or damaged camera RAW file")


# --------------------------------------------------------------------------- RAW+JPEG pairs


def test_raw_pairs_skip_a_raw_file_with_a_developed_twin():
    def items(*paths):
        return [Item(name=p, path=p) for p in paths]

    given = items("a/IMG_1.CR2", "a/img_1.jpg", "a/IMG_2.NEF", "a/IMG_3.dng", "a/IMG_3.HEIC", "b/IMG_2.jpg",
                  "a/IMG_4.arw", "a/IMG_4.webp", "a/IMG_5.raf", "a/IMG_5.tif", "a/./IMG_6.orf", "a/IMG_6.png")
    kept, skipped = raw_pairs(given)
    assert [i.path for i in skipped] == ["a/IMG_1.CR2", "a/IMG_3.dng", "a/IMG_5.raf", "a/./IMG_6.orf"]
    assert [i.path for i in kept] == ["a/img_1.jpg", "a/IMG_2.NEF", "a/IMG_3.HEIC", "b/IMG_2.jpg", "a/IMG_4.arw",
                                      "a/IMG_4.webp", "a/IMG_5.tif", "a/IMG_6.png"]
    broken = [Item(name="x/p.jpg", path="x/p.jpg", error="dangling symlink"), *items("x/p.dng")]
    assert raw_pairs(broken) == (broken, [])  # a twin that cannot be read keeps its RAW
    assert raw_pairs([Item(name="https://h/p.dng", url="https://h/p.dng"), *items("p.jpg")])[1] == []


# --------------------------------------------------------------------------- embeddings and the CLI


def mixed_folder(folder: Path, source: Image.Image) -> list[Path]:
    """One file of each format: HEIC, AVIF, DNGs, TIFFs, CMYK, and the lossless ones."""
    tifffile = pytest.importorskip("tifffile")
    folder.mkdir()
    paths = [heif_file(source, folder / "phone.heic", "HEIF", orientation=6),
             heif_file(source, folder / "web.avif", "AVIF", orientation=3),
             save(source, folder / "photo.jpg", "JPEG", quality=90),
             save(cmyk_ramp(), folder / "print.tif", "TIFF"),
             save(cmyk_ramp(), folder / "print.jpg", "JPEG")]
    deep = (np.asarray(source, dtype=np.uint16) * 257)[None].repeat(2, 0)
    tifffile.imwrite(folder / "scan.tif", deep, photometric="rgb")
    paths.append(folder / "scan.tif")
    buffer = io.BytesIO()
    scene_preview((120, 80)).save(buffer, "JPEG", quality=95)
    (folder / "camera.dng").write_bytes(dng_bytes(mosaic(128, 192), buffer.getvalue(), orientation=8))
    paths += [folder / "camera.dng", pidng_file(folder / "plain.dng", mosaic(96, 128), orientation=1)]
    sub = folder / "more"
    sub.mkdir()
    paths += [path for path, _ in lossless_files(sub).values()]
    return sorted(paths)


def test_every_format_embeds_like_its_pixels_as_png(tmp_path, source, tiny_vit_checkpoint):
    from clipcli.pipeline import load_model

    model = load_model(str(tiny_vit_checkpoint), device="cpu")
    files = mixed_folder(tmp_path / "photos", source)
    _, options = image_step(model, DecodeOptions())  # as the pipeline decodes: draft size 64
    twins = []
    for path in files:
        twin = tmp_path / "png" / f"{path.parent.name}-{path.name}.png"
        twin.parent.mkdir(exist_ok=True)
        read_image(Item(name=str(path), path=str(path)), options).save(twin)
        twins.append(twin)
    items = [Item(name=str(p), path=str(p)) for p in files + twins]
    results = list(embed_images(model, items, batch_size=len(items), workers=0))
    assert [r.error for r in results] == [None] * len(items)
    vectors = np.stack([r.embedding for r in results])
    for index, path in enumerate(files):
        difference = np.abs(vectors[index] - vectors[len(files) + index]).max()
        assert difference <= 1e-6, (path.name, difference)


def test_encode_a_folder_mixing_formats(tmp_path, source, tiny_vit_checkpoint):
    files = mixed_folder(tmp_path / "photos", source)
    assert sorted(Path(i.path) for i in expand_inputs([str(tmp_path / "photos")])) == files
    result = CliRunner().invoke(app, ["encode", str(tmp_path / "photos"), "-m", str(tiny_vit_checkpoint),
                                      "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(Path(r["image"]) for r in records) == files
    assert {r["status"] for r in records} == {"ok"}, [r for r in records if r["status"] != "ok"]


def test_an_embedded_colour_profile_is_applied_except_in_exact_decoding(tmp_path):
    """An image tagged with a colour profile is seen in sRGB, as a colour-managed viewer shows it:
    colord's "Swapped Red and Green" profile (CC0) makes stored red show green; an Adobe RGB
    photo's saturated green is out of sRGB's gamut (clipped) and its grey stays grey. An sRGB
    profile changes nothing, and --exact-decode leaves profiles alone, as the reference does."""
    swapped, adobe = (DATA / "icc" / "SwappedRedAndGreen.icc").read_bytes(), (DATA / "icc" / "AdobeRGB1998.icc").read_bytes()
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    shown = decode(save(red, tmp_path / "swapped.png", "PNG", icc_profile=swapped))
    assert np.abs(pixels(shown)[0, 0] - (0, 255, 0)).max() <= 2
    assert (pixels(decode(tmp_path / "swapped.png", exact=True).convert("RGB"))[0, 0] == (255, 0, 0)).all()
    tiles = Image.new("RGB", (32, 32), (128, 128, 128))
    tiles.paste((0, 255, 0), (0, 0, 16, 32))
    shown = pixels(decode(save(tiles, tmp_path / "adobe.jpg", "JPEG", quality=95, icc_profile=adobe)))
    assert shown[8, 4, 1] >= 250 and shown[8, 4, 0] <= 10  # pure green: the most sRGB shows
    assert np.abs(shown[8, 28] - shown[8, 28].mean()).max() <= 2  # grey stays neutral
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    same = decode(save(red, tmp_path / "srgb.png", "PNG", icc_profile=srgb))
    assert (pixels(same) == pixels(red)).all()
    broken = decode(save(red, tmp_path / "broken.png", "PNG", icc_profile=b"not a profile"))
    assert (pixels(broken) == pixels(red)).all()  # a damaged profile is ignored, the pixels kept
