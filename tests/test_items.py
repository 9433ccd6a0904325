"""The input layer: finding images, list files, URL fetching and decoding, with a bad-input
corpus generated here (no binary blobs) and a 127.0.0.1 server for the URL cases."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipcli import http as fetching
from clipcli import images
from clipcli.errors import InputError, ItemError
from clipcli.http import FetchOptions, fetch_url
from clipcli.images import DecodeOptions, pillow_limits, read_image, to_rgb
from clipcli.items import Item, expand_inputs, parse_list
from clipcli.messages import hinted
from clipcli.output import to_json


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def reason(item_or_path, **options) -> str:
    item = item_or_path if isinstance(item_or_path, Item) else Item(name=str(item_or_path), path=str(item_or_path))
    with pytest.raises(ItemError) as caught, pillow_limits(DecodeOptions(**options)):
        read_image(item, DecodeOptions(**options))
    return caught.value.reason


def decoded(path: Path, **options) -> Image.Image:
    with pillow_limits(DecodeOptions(**options)):
        return read_image(Item(name=str(path), path=str(path)), DecodeOptions(**options))


RED = Image.new("RGB", (16, 16), (255, 0, 0))


# --------------------------------------------------------------------------- finding files


def names(items):
    return [item.name for item in items]


def test_folders_recursive_sorted_case_insensitive_extensions(tmp_path):
    root = tmp_path / "photos"
    for rel in ["b.JPG", "a.png", "sub/c.WebP", "sub/deeper/d.tiff", "notes.txt", ".hidden.png", "Z.gif", "e.Jpeg"]:
        write(root / rel, png_bytes(RED))
    (root / "empty").mkdir()
    found = names(expand_inputs([str(root)]))
    assert found == [str(root / p) for p in ["a.png", "b.JPG", "e.Jpeg", "sub/c.WebP", "sub/deeper/d.tiff", "Z.gif"]]
    assert found == names(expand_inputs([str(root)]))  # deterministic


def test_symlink_loops_are_never_followed(tmp_path):
    root = tmp_path / "photos"
    write(root / "a.png", png_bytes(RED))
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # folder loop
    os.symlink("loop.png", root / "loop.png")  # file that points at itself
    os.symlink("missing.png", root / "dangling.png")
    items = expand_inputs([str(root)])
    assert names(items) == [str(root / p) for p in ["a.png", "dangling.png", "loop.png"]]
    assert reason(items[1]) == "dangling symlink (target missing)"
    assert reason(items[2]) == "symlink loop"


def test_missing_input_and_empty_result_are_usage_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        expand_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        expand_inputs([str(tmp_path / "empty")])


def test_outputs_inside_an_input_folder_are_not_picked_up(tmp_path):
    write(tmp_path / "a.png", png_bytes(RED))
    write(tmp_path / "heatmap.png", png_bytes(RED))
    assert names(expand_inputs([str(tmp_path)], exclude=[tmp_path / "heatmap.png"])) == [str(tmp_path / "a.png")]


def test_list_files_comments_blanks_crlf_bom_and_relative_paths(tmp_path):
    write(tmp_path / "lists" / "imgs" / "a.png", png_bytes(RED))
    listing = "\ufeff# my photos\r\n\r\nimgs/a.png\r\n  https://example.com/x.jpg  \r\nftp://example.com/y.jpg\r\n/abs/z.png\r\n"
    write(tmp_path / "lists" / "photos.txt", listing.encode())
    items = expand_inputs([str(tmp_path / "lists" / "photos.txt")])
    assert names(items) == [
        str(tmp_path / "lists" / "imgs" / "a.png"),
        "https://example.com/x.jpg",
        "ftp://example.com/y.jpg",
        "/abs/z.png",
    ]
    assert items[1].url == "https://example.com/x.jpg"
    assert "unsupported URL scheme 'ftp'" in items[2].error
    assert reason(items[3]) == "file not found"


def test_list_from_stdin_resolves_against_the_current_folder(tmp_path, monkeypatch):
    write(tmp_path / "a.png", png_bytes(RED))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a.png\n# c\n\nb.png\n")))
    assert names(expand_inputs(["-"])) == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"ok.png\n\xff\xfe.png\n", "line 2: not valid UTF-8"),
        (b"a.png\nb\x00.png\n", "line 2: contains a NUL byte"),
        (b"a.png\n" + b"x" * 20000 + b"\n", "line 2: line is 20000 characters long"),
    ],
)
def test_bad_list_files_name_the_line(tmp_path, data, message):
    path = write(tmp_path / "list.txt", data)
    with pytest.raises(InputError, match=message) as caught:
        expand_inputs([str(path)])
    assert "list.txt" in str(caught.value)


def test_files_without_image_extension_are_sniffed(tmp_path):
    write(tmp_path / "photo.heic", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40)  # binary: an image item
    assert names(expand_inputs([str(tmp_path / "photo.heic")])) == [str(tmp_path / "photo.heic")]
    assert "HEIC" in reason(tmp_path / "photo.heic")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), max_size=30),
                max_size=20),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_list_parser_properties(lines, newline, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode()
    parsed = parse_list(data, "prop")
    # Only \n, \r\n (and \r) end a line: U+2028 or NEL in a file name stay part of it.
    expected = [line.strip() for line in lines]
    expected = [line for line in expected if line and not line.startswith("#")]
    if bom and lines and lines[0][:1] == "\ufeff":
        return  # a second BOM is content; not worth a special case here
    assert parsed == expected


def test_undecodable_file_names_are_kept_losslessly(tmp_path):
    folder = os.fsencode(tmp_path)
    raw = os.path.join(folder, b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write(png_bytes(RED))
    [item] = expand_inputs([str(tmp_path)])
    assert os.fsencode(item.name) == raw
    assert read_image(item).size == (16, 16)
    text = to_json({"image": item.name})
    text.encode("utf-8")  # printable as UTF-8
    assert json.loads(text)["image"] == item.name


# --------------------------------------------------------------------------- decoding: bad files


def test_zero_byte_file(tmp_path):
    assert reason(write(tmp_path / "empty.jpg", b"")) == "empty file (0 bytes)"


def test_text_and_html_named_jpg(tmp_path):
    assert reason(write(tmp_path / "notes.jpg", b"hello, I am text\n")) == "not an image: a text file"
    assert reason(write(tmp_path / "page.jpg", b"<!DOCTYPE html><html><body>404</body></html>")).startswith(
        "not an image: an HTML page"
    )


@pytest.mark.parametrize(
    "data, name",
    [
        (b"8BPS\x00\x01" + b"\x00" * 60, "PSD"),
        (b"%PDF-1.7\n" + b"\x00" * 60, "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"\x00" * 40, "EPS"),
        (b"SIMPLE  =                    T" + b"\x00" * 40, "FITS"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40, "AVIF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, "HEIC"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
    ],
)
def test_unsupported_formats_say_what_they_are(tmp_path, data, name):
    assert name in reason(write(tmp_path / "x.png", data))


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "SGI"])
def test_pillow_formats_outside_the_allow_list_are_not_opened(tmp_path, fmt):
    path = write(tmp_path / "x.png", png_bytes(RED, format=fmt))
    assert decoded(tmp_path / "x.png", formats=images.IMAGE_FORMATS + (fmt,)).size == (16, 16)  # Pillow could
    got = reason(path)
    assert got.startswith(("unsupported format", "not a recognised image")), got


def test_decoders_are_restricted_with_formats(tmp_path, monkeypatch):
    seen = {}
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        seen["formats"] = formats
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    decoded(write(tmp_path / "a.png", png_bytes(RED)))
    assert seen["formats"] == list(images.PILLOW_FORMATS)


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_files_fail_unless_allowed(tmp_path, fmt, suffix):
    photo = Image.effect_noise((64, 64), 60).convert("RGB")
    data = png_bytes(photo, format=fmt)
    path = write(tmp_path / f"cut.{suffix}", data[: len(data) * 2 // 3])
    message = reason(path)
    assert message.startswith("truncated image") and message.fix == "allow_truncated"
    assert decoded(path, allow_truncated=True).size == (64, 64)


def test_pixel_cap_is_checked_before_decoding(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", png_bytes(Image.new("RGB", (100, 50))))
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1))
    assert reason(path, max_pixels=4999) == (
        "image too large: 100x50 = 5000 pixels exceeds the limit of 4999"
    )
    assert not loads


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels but holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_header_is_refused(tmp_path):
    path = write(tmp_path / "bomb.png", _png_header(100_000, 100_000))
    assert reason(path).startswith("image too large")
    assert Image.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_PIXELS  # restored after the run


@pytest.mark.parametrize(
    "error",
    [OSError("bad"), SyntaxError("bad"), ValueError("bad"), MemoryError(), NotImplementedError("bad"),
     OverflowError("bad"), Image.DecompressionBombError("bad"), struct.error("bad"), EOFError(),
     IndexError("bad"), KeyError("bad"), TypeError("bad"), RuntimeError("unexpected")],
)
def test_every_exception_pillow_raises_becomes_a_reason(tmp_path, monkeypatch, error):
    path = write(tmp_path / "a.png", png_bytes(RED))

    def broken_load(self):
        raise error

    monkeypatch.setattr(Image.Image, "load", broken_load)
    monkeypatch.setattr(Image, "open", lambda fp, mode="r", formats=None: Image.new("RGB", (4, 4)))
    assert reason(path)


def test_special_files(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert reason(fifo) == "not a regular file"
    assert reason(Item(name="gone.png", path=str(tmp_path / "gone.png"))) == "file not found"
    assert reason(Item(name="d", path=str(tmp_path))) == "is a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "secret.png", png_bytes(RED))
    path.chmod(0)
    assert reason(path) == "permission denied"


# --------------------------------------------------------------------------- decoding: good files


def test_rgba_and_palette_transparency_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = decoded(write(tmp_path / "a.png", png_bytes(rgba)))
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    image = decoded(write(tmp_path / "p.png", png_bytes(palette, transparency=1)))
    assert image.getpixel((2, 2)) == (255, 255, 255)

    la = Image.new("LA", (4, 4), (0, 0))
    assert decoded(write(tmp_path / "la.png", png_bytes(la))).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = Image.new("I;16", (4, 1))
    for x, value in enumerate([0, 257 * 64, 257 * 128, 65535]):
        grey.putpixel((x, 0), value)
    image = decoded(write(tmp_path / "g16.png", png_bytes(grey)))
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]

    wide = Image.new("I", (2, 1))
    wide.putpixel((0, 0), 1000)
    wide.putpixel((1, 0), 3000)
    assert to_rgb(wide).getpixel((0, 0)) != (255, 255, 255)


def test_cmyk_and_one_bit(tmp_path):
    cmyk = decoded(write(tmp_path / "c.jpg", png_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), format="JPEG")))
    red, green, blue = cmyk.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60
    one = decoded(write(tmp_path / "b.png", png_bytes(Image.new("1", (8, 8), 1))))
    assert one.mode == "RGB" and one.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    upright = decoded(write(tmp_path / "phone.png", png_bytes(image, exif=exif)))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5)) == (255, 0, 0) and upright.getpixel((10, 35)) == (0, 0, 255)


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    image = decoded(write(tmp_path / "anim.gif", buffer.getvalue()))
    assert image.getpixel((4, 4)) == (255, 0, 0)


# --------------------------------------------------------------------------- URLs


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.hits[self.path] = server.hits.get(self.path, 0) + 1
        route = self.path
        if route == "/ok.png":
            self.reply(200, server.image, "image/png")
        elif route == "/html":
            self.reply(200, b"<html><body>Not found, but 200</body></html>", "text/html")
        elif route == "/missing":
            self.reply(404, b"no", "text/plain")
        elif route == "/flaky":
            if server.hits[route] <= 2:
                self.reply(503, b"busy", "text/plain")
            else:
                self.reply(200, server.image, "image/png")
        elif route == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif route == "/endless":  # no Content-Length, body until close
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\x00" * 65536)
            except OSError:
                pass
            self.close_connection = True
        elif route == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        elif route.startswith("/redirect?"):
            self.send_response(302)
            self.send_header("Location", route.split("?", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.reply(404, b"", "text/plain")

    def reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.hits = {}
    httpd.image = png_bytes(RED)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


LOCAL = FetchOptions(allow_private=True, backoff=0.0, timeout=5.0)


def fetch_reason(url, options=LOCAL) -> str:
    with pytest.raises(ItemError) as caught:
        fetch_url(url, options)
    return str(caught.value)


def test_fetch_an_image(server):
    data, content_type = fetch_url(server.base + "/ok.png", LOCAL)
    assert data == server.image and content_type == "image/png"
    image = read_image(Item(name="u", url=server.base + "/ok.png"), fetch=LOCAL)
    assert image.size == (16, 16)


def test_loopback_is_refused_unless_allowed(server):
    with pytest.raises(ItemError) as caught:
        fetch_url(server.base + "/ok.png", FetchOptions())
    assert "loopback" in str(caught.value) and caught.value.fix == "allow_private"
    assert hinted(caught.value.reason).endswith("; pass --allow-private to fetch from it")
    assert server.hits == {}


@pytest.mark.parametrize("address, kind", [("10.1.2.3", "private"), ("169.254.169.254", "link-local"),
                                           ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "")])
def test_private_addresses_are_refused_after_dns(monkeypatch, address, kind):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(family, socket.SOCK_STREAM, 6, "", (address, 80))])
    message = fetch_reason("http://photos.example.com/cat.jpg", FetchOptions())
    assert message.startswith("refused") and kind in message


def test_redirects_are_checked_again(server, monkeypatch):
    # Treat 127.0.0.1 as public for this test; a redirect to 127.0.0.2 must still be refused.
    monkeypatch.setattr(fetching, "_address_refusal", lambda ip: "refused: private" if ip == "127.0.0.2" else None)
    port = server.server_address[1]
    assert fetch_url(f"{server.base}/redirect?{server.base}/ok.png", FetchOptions())[0] == server.image
    assert fetch_reason(f"{server.base}/redirect?http://127.0.0.2:{port}/ok.png", FetchOptions()) == "refused: private"
    assert "unsupported scheme 'ftp'" in fetch_reason(f"{server.base}/redirect?ftp://example.com/a.jpg")
    assert fetch_reason(f"{server.base}/redirect?file:///etc/passwd").startswith("refused: HTTP 302")


def test_only_http_and_https(server):
    assert "unsupported URL scheme 'file'" in fetch_reason("file:///etc/passwd")
    assert "unsupported URL scheme 'ftp'" in expand_inputs(["ftp://example.com/a.jpg"])[0].error


def test_html_with_status_200_is_a_decode_failure(server):
    with pytest.raises(ItemError, match=r"not an image: an HTML page \(server sent text/html\)"):
        read_image(Item(name="u", url=server.base + "/html"), fetch=LOCAL)


def test_size_cap_is_counted_while_streaming(server):
    small = FetchOptions(allow_private=True, max_bytes=100_000, backoff=0.0)
    assert "declared" in fetch_reason(server.base + "/declared-big", small)
    assert fetch_reason(server.base + "/endless", small) == "too large: more than 100000 bytes"


def test_slow_drip_hits_the_deadline(server):
    started = time.monotonic()
    message = fetch_reason(server.base + "/drip", FetchOptions(allow_private=True, deadline=0.5, timeout=5.0))
    assert message.startswith("too slow") and time.monotonic() - started < 5


def test_transient_errors_are_retried_and_client_errors_are_not(server):
    assert fetch_url(server.base + "/flaky", LOCAL)[0] == server.image
    assert server.hits["/flaky"] == 3
    assert fetch_reason(server.base + "/missing") == "HTTP 404 Not Found"
    assert server.hits["/missing"] == 1
    assert fetch_reason(server.base + "/flaky2") == "HTTP 404 Not Found"


def test_connection_refused_is_reported(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert fetch_reason(f"http://127.0.0.1:{port}/x.png").startswith("cannot reach 127.0.0.1")


def test_permission_denied_is_a_reason_even_as_root(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.png", png_bytes(RED))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", denied, raising=False)
    assert reason(path) == "permission denied"


def test_each_input_expands_on_its_own(tmp_path):
    write(tmp_path / "a.png", png_bytes(RED))
    assert names(expand_inputs([str(tmp_path), str(tmp_path)])) == [str(tmp_path / "a.png")] * 2


def test_reduced_jpeg_decoding_keeps_at_least_the_draft_size(tmp_path):
    picture = Image.new("RGB", (2000, 1600), (10, 200, 30))
    jpeg = write(tmp_path / "big.jpg", png_bytes(picture, format="JPEG"))
    png = write(tmp_path / "big.png", png_bytes(picture))
    assert decoded(jpeg, draft_size=448).size == (1000, 800)  # 1/4 would leave 400 < 448
    assert decoded(jpeg, draft_size=200).size == (250, 200)
    assert decoded(jpeg, draft_size=448, exact=True).size == (2000, 1600)
    assert decoded(png, draft_size=448).size == (2000, 1600)  # only JPEG has DCT scales
