"""Finding, fetching and decoding images: one input layer for every command.

An *input* on the command line is an image file, a folder (searched recursively for image
extensions, in sorted order), a list file (one path or http(s) URL per line), ``-`` (such a
list on stdin) or a URL. :func:`expand_inputs` turns inputs into :class:`Item` s, one per
image, in a deterministic order. :func:`read_image` turns one item into an upright RGB
``PIL.Image``; anything wrong with that one item raises :class:`ItemError` with a short
reason, which callers turn into an error record and then go on with the next item.

Usage mistakes (an input that does not exist, a list file that is not UTF-8) raise
:class:`~clipcli.errors.InputError` instead: they stop the run before any work is done.

Decoding is deliberately narrow: only the formats in :data:`IMAGE_FORMATS` are opened
(Pillow's ``formats=``), the pixel count is checked from the header before any pixel is
decoded, and every exception Pillow raises on malformed data becomes a reason string.
Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import codecs
import errno
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator, Sequence

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Always read as list files; other files without an image extension are sniffed.
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".urls", ".csv", ".tsv"})
# Pillow format names we open (the JPEG opener also yields MPO, as many camera JPEGs are).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Pillow's own default cap (about 89 megapixels).
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
MAX_LINE_CHARS = 16384
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ItemError(InputError):
    """One item cannot be used; ``str(error)`` is the reason put in its error record."""


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One image to score: a local path or an http(s) URL.

    ``name`` is what records show: the path as the user can reach it from the current
    folder (list entries are joined to their list file's folder), or the URL. ``error`` is
    set when the item is known to be unusable before any reading (e.g. an ``ftp://`` URL).
    """

    name: str
    path: str | None = None
    url: str | None = None
    error: str | None = None


def display(text: str) -> str:
    """``text`` safe to print or encode as UTF-8: undecodable bytes from file names
    (surrogate escapes) are shown as ``\\udcXX``, which JSON reads back losslessly."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text: str) -> str:
    """``text`` as one safe line for a terminal: line breaks become spaces; other control
    characters (escape sequences that could retitle or clear the terminal, bidi overrides)
    are shown escaped, as ``\x1b`` or ``\u202e``; undecodable file-name bytes as by
    :func:`display`."""
    out = []
    for char in " ".join(re.split(r"[\r\n\t]+", display(text).strip())):  # line breaks: one space
        code = ord(char)
        if code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif unicodedata.category(char) in ("Cf", "Zl", "Zp") and code not in (0x200D,):
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def url_scheme(text: str) -> str | None:
    match = _URL_SCHEME.match(text)
    return match.group(1).lower() if match else None


def _url_item(url: str) -> Item:
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        try:
            credentials = _has_credentials(url)
        except ValueError as error:
            return Item(name=url, error=f"not a valid URL ({error})")
        if credentials:  # never sent, nor shown: they would travel to every redirect target, and into logs
            return Item(name=redact_credentials(url),
                        error="refused: the URL holds a user name or password (user:pass@host)")
        return Item(name=url, url=url)
    return Item(name=url, error=f"unsupported URL scheme {scheme!r} (only http and https are fetched)")


def _has_credentials(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.username is not None or parts.password is not None
    except ValueError:  # not a valid URL: fetching it fails with its own reason
        return False


def redact_credentials(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/?#@]*@", r"\1***@", url)


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- list files


def parse_list(data: bytes, source: str, *, comments: bool = True) -> list[str]:
    """Lines of a UTF-8 list file (BOM and CRLF allowed), stripped, blank lines skipped.

    With ``comments``, lines starting with ``#`` are skipped too. A decoding error, a NUL
    byte or a line over :data:`MAX_LINE_CHARS` raises :class:`InputError` naming the line.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{source}, line {number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
        if "\x00" in line:
            raise InputError(f"{source}, line {number}: contains a NUL byte (is this a binary file?)")
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"{source}, line {number}: line is {len(line)} characters long (limit {MAX_LINE_CHARS})")
        line = line.strip()
        if not line or (comments and line.startswith("#")):
            continue
        lines.append(line)
    return lines


def read_lines(path: str | os.PathLike, *, comments: bool = True) -> list[str]:
    """:func:`parse_list` of a file; ``-`` reads stdin."""
    if os.fspath(path) == "-":
        return parse_list(sys.stdin.buffer.read(), "stdin", comments=comments)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"no such file: {display(os.fspath(path))}") from None
    except IsADirectoryError:
        raise InputError(f"{display(os.fspath(path))} is a folder, expected a text file") from None
    except OSError as error:
        raise InputError(f"cannot read {display(os.fspath(path))}: {error.strerror or error}") from None
    return parse_list(data, display(os.fspath(path)), comments=comments)


def _looks_like_text(head: bytes) -> bool:
    """Whether the start of a file reads as a list (UTF-8 text, not binary or SVG/HTML markup)."""
    head = head.removeprefix(codecs.BOM_UTF8)
    if b"\x00" in head or head.lstrip()[:1] == b"<":  # binary, or markup (SVG/HTML): an image item
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _is_list_file(path: str) -> bool:
    """Whether a regular file without an image extension is a list file rather than an image."""
    if os.path.splitext(path)[1].lower() in LIST_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return _looks_like_text(f.read(65536))
    except OSError:
        return False


def _read_stream(path: str) -> bytes:
    """All of a pipe, FIFO or ``/dev/fd/N`` (which can be read only once)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise InputError(f"cannot read {display(path)}: {error.strerror or error}") from None


def _is_stream(path: str) -> bool:
    """A pipe or FIFO (``<(...)`` is one): readable once. Character devices such as
    /dev/zero are not streams here: as items they are refused as not regular files."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _list_entries(lines: Sequence[str], base: str, visited: set) -> Iterator[Item]:
    for line in lines:
        if url_scheme(line):
            yield _url_item(line)
            continue
        path = line if os.path.isabs(line) or not base else os.path.join(base, line)
        if os.path.isdir(path):
            yield from walk_folder(path, visited)
        else:
            yield Item(name=path, path=path)


# --------------------------------------------------------------------------- folders


def _sort_key(name: str) -> tuple[str, str]:
    return (name.casefold(), name)


def walk_folder(folder: str, visited: set | None = None, exclude: frozenset[str] = frozenset()) -> Iterator[Item]:
    """Image files under ``folder``, recursively, sorted by name at each level.

    Symlinked folders are followed once: a folder already visited (by device and inode)
    is skipped, so a symlink loop is never followed. Dangling or looping symlinks with an
    image extension become items with an error; an unreadable folder becomes one item
    with an error. Hidden entries (names starting with ``.``) are skipped.
    """
    visited = set() if visited is None else visited
    try:
        st = os.stat(folder)
    except OSError as error:
        yield Item(name=folder, error=f"cannot read folder: {error.strerror or error}")
        return
    if (st.st_dev, st.st_ino) in visited:
        return
    visited.add((st.st_dev, st.st_ino))
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: _sort_key(e.name))
    except OSError as error:
        yield Item(name=folder, error=f"cannot read folder: {error.strerror or error}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.join(folder, entry.name)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            yield from walk_folder(path, visited, exclude)
        elif has_image_extension(entry.name) and os.path.abspath(path) not in exclude:
            yield Item(name=path, path=path)


# --------------------------------------------------------------------------- expansion


EMPTY_FOLDER = "the folder holds no images (jpg, jpeg, png, webp, bmp, gif, tif, tiff)"


def _missing(path: str) -> str | None:
    """None when ``path`` exists; "" when it does not; the reason when it cannot be looked at
    (a folder on its way that cannot be searched: one failed item, not the end of the run)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError as error:
        return f"cannot look at it: {error.strerror or error}"
    return None


def expand_inputs(inputs: Sequence[str], *, exclude: Sequence[str | os.PathLike] = ()) -> list[Item]:
    """One :class:`Item` per image named by ``inputs``, in order.

    Each input is a URL, an image file, a folder, a list file or ``-`` (a list on stdin).
    Files listed in ``exclude`` (the run's own outputs) are not picked up from folders.
    A missing input or an empty result raises :class:`InputError`.
    """
    excluded = frozenset(os.path.abspath(p) for p in exclude)
    items: list[Item] = []
    for arg in inputs:
        visited: set = set()  # per input: a folder named twice is expanded twice, a loop never
        if arg == "-":
            items.extend(_list_entries(read_lines("-"), "", visited))
        elif url_scheme(arg):
            items.append(_url_item(arg))
        elif os.path.isdir(arg):  # a folder named x.jpg included
            items.extend(list(walk_folder(arg, visited, excluded)) or [Item(name=arg, error=EMPTY_FOLDER)])
        elif (problem := _missing(arg)) is not None:
            if problem == "":
                raise InputError(f"no such file or folder: {display(arg)}")
            items.append(Item(name=arg, error=problem))
        elif has_image_extension(arg):
            items.append(Item(name=arg, path=arg))
        elif _is_stream(arg):  # <(...), a FIFO: read once, then sniffed and parsed from the same bytes
            data = _read_stream(arg)
            if not _looks_like_text(data[:65536]):
                raise InputError(f"{display(arg)} is a pipe that does not hold a list of paths or URLs")
            items.extend(_list_entries(parse_list(data, display(arg)), "", visited))
        elif not _is_list_file(arg):
            items.append(Item(name=arg, path=arg))
        else:
            items.extend(_list_entries(read_lines(arg), os.path.dirname(arg), visited))
    if all(item.error == EMPTY_FOLDER for item in items):
        raise InputError(f"no images found in {display(', '.join(inputs))}")
    return items


# --------------------------------------------------------------------------- URLs


@dataclass(frozen=True)
class FetchOptions:
    """How URLs are fetched. ``timeout`` bounds connecting and each read; ``deadline``
    bounds the whole download (a slow drip); ``max_bytes`` is counted while streaming."""

    timeout: float = 10.0
    deadline: float = 60.0
    max_bytes: int = 64 * 1024 * 1024
    retries: int = 2
    backoff: float = 0.5
    allow_private: bool = False


class _Refused(Exception):
    """A request we will not make or finish; never retried."""


class _Transient(Exception):
    """A failure worth retrying (timeouts, resets, 5xx, 429)."""


_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _address_refusal(ip_text: str) -> str | None:
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    kind = "loopback" if ip.is_loopback else "link-local" if ip.is_link_local else "private or reserved"
    return f"refused: address {ip} is {kind} (pass --allow-private to fetch from it)"


def _guarded_connector(allow_private: bool):
    """A ``socket.create_connection`` that checks every resolved address before connecting
    to it, so a DNS answer cannot point a fetch at the local network (rebinding included)."""

    def connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        refusal = None
        last_error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            if not allow_private:
                refusal = _address_refusal(sockaddr[0])
                if refusal:
                    continue
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as error:
                sock.close()
                last_error = error
        if last_error is not None:
            raise last_error
        raise _Refused(refusal or f"cannot resolve {host}")

    return connect


def _opener(allow_private: bool) -> urllib.request.OpenerDirector:
    connector = _guarded_connector(allow_private)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connector

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connector

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(GuardedHTTPConnection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(GuardedHTTPSConnection, req, context=ssl.create_default_context())

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            parts = urllib.parse.urlsplit(newurl)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise _Refused(f"refused: redirect to unsupported scheme {scheme!r}")
            if _has_credentials(newurl):
                raise _Refused("refused: redirect to a URL holding a user name or password")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # ProxyHandler({}): connect directly, so the address check applies to the real server.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), HTTPHandler, HTTPSHandler, RedirectHandler
    )


def _fetch_once(url: str, options: FetchOptions) -> tuple[bytes, str]:
    from . import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"clipcli/{__version__}"})
    started = time.monotonic()
    try:
        response = _opener(options.allow_private).open(request, timeout=options.timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if 300 <= error.code < 400:  # urllib's own refusal of a redirect (e.g. to file://)
            raise _Refused(f"refused: HTTP {error.code} {error.reason}") from None
        if error.code in _TRANSIENT_STATUS:
            raise _Transient(f"HTTP {error.code} {error.reason}") from None
        raise _Refused(f"HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, _Refused):
            raise reason from None
        if isinstance(reason, (TimeoutError, socket.timeout, ConnectionResetError, ConnectionAbortedError)):
            raise _Transient(f"network error: {reason}") from None
        if isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_AGAIN:
            raise _Transient(f"DNS lookup failed temporarily: {reason}") from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise _Refused(f"TLS certificate not valid: {reason.verify_message or reason}") from None
        raise _Refused(f"cannot fetch: {getattr(reason, 'strerror', None) or reason}") from None
    except (TimeoutError, socket.timeout, ConnectionResetError, http.client.RemoteDisconnected) as error:
        raise _Transient(f"network error: {error or type(error).__name__}") from None
    with response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > options.max_bytes:
            raise _Refused(f"too large: {int(declared)} bytes declared (limit {options.max_bytes})")
        content_type = response.headers.get_content_type()
        chunks, total = [], 0
        try:
            while True:
                # read1 returns what has arrived; read(n) would wait for all n bytes of a slow drip.
                chunk = response.read1(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > options.max_bytes:
                    raise _Refused(f"too large: more than {options.max_bytes} bytes")
                if time.monotonic() - started > options.deadline:
                    raise _Refused(f"too slow: not finished after {options.deadline:g} s")
                chunks.append(chunk)
        except (TimeoutError, socket.timeout):
            raise _Transient(f"read timed out after {options.timeout:g} s") from None
        except (http.client.IncompleteRead, ConnectionResetError) as error:
            raise _Transient(f"connection broken: {type(error).__name__}") from None
    return b"".join(chunks), content_type


def fetch_url(url: str, options: FetchOptions = FetchOptions()) -> tuple[bytes, str]:
    """``(body, content_type)`` of an http(s) URL, with retries of transient failures.
    Raises :class:`ItemError` with the reason otherwise."""
    scheme = url_scheme(url)
    if scheme not in ("http", "https"):
        raise ItemError(f"unsupported URL scheme {scheme!r} (only http and https are fetched)")
    if _has_credentials(url):
        raise ItemError("refused: the URL holds a user name or password (user:pass@host)")
    for attempt in range(options.retries + 1):
        try:
            return _fetch_once(url, options)
        except _Refused as error:
            raise ItemError(str(error)) from None
        except _Transient as error:
            if attempt == options.retries:
                tries = f" (after {attempt + 1} tries)" if attempt else ""
                raise ItemError(f"{error}{tries}") from None
            time.sleep(options.backoff * 2**attempt)
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise ItemError(f"cannot fetch: {error}") from None
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeOptions:
    """How images are decoded: the pixel cap checked from the header, whether a truncated
    file is scored from what could be decoded, and reduced-size JPEG decoding.

    With ``draft_size`` (and not ``exact``), a JPEG is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) that still leaves both sides at least ``draft_size`` pixels; the exact
    bicubic resize then runs on that. The pipeline sets it to twice the model's resolution.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False
    formats: tuple[str, ...] = IMAGE_FORMATS
    exact: bool = False
    draft_size: int | None = None


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
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x89HDF", "HDF5"),
)
_SUPPORTED = "JPEG, PNG, WebP, BMP, GIF, TIFF"


def _why_unidentified(head: bytes, content_type: str | None) -> str:
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return f"unsupported format: AVIF (not among the formats clipcli opens: {_SUPPORTED})"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "unsupported format: HEIC/HEIF (no HEIF decoder in Pillow; convert to JPEG or PNG)"
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
            head.decode("utf-8")
            return "not an image: a text file"
        except UnicodeDecodeError:
            pass
    return f"not a recognised image (clipcli opens {_SUPPORTED})"


def _reason(error: BaseException, allow_truncated: bool) -> str:
    from PIL import Image

    message = str(error) or type(error).__name__
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large: {message}"
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    if "truncated" in message.lower() or "broken data stream" in message.lower():
        hint = "" if allow_truncated else " (pass --allow-truncated to score what can be decoded)"
        return f"truncated image: {message}{hint}"
    return f"cannot decode: {message}" if isinstance(error, OSError) else f"cannot decode ({type(error).__name__}): {message}"


def to_rgb(image: "Image.Image") -> "Image.Image":
    """An RGB copy of ``image`` in any Pillow mode.

    Transparency is composited on white; 16- and 32-bit greyscale is scaled to 8 bits
    (not clipped to white); everything else uses Pillow's conversion.
    """
    from PIL import Image

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


def decode_image(fp: BinaryIO, options: DecodeOptions = DecodeOptions(), content_type: str | None = None) -> "Image.Image":
    """Decode the first frame of an image file object into an upright RGB image.

    Raises :class:`ItemError` with a specific reason for any malformed, unsupported,
    truncated or oversized input; nothing Pillow raises on bad data escapes.
    """
    from PIL import Image, UnidentifiedImageError

    head = fp.read(64)
    fp.seek(0)
    if not head:
        raise ItemError("empty file (0 bytes)")
    try:
        try:
            image = Image.open(fp, formats=list(options.formats))
        except UnidentifiedImageError:
            raise ItemError(_why_unidentified(head, content_type)) from None
        width, height = image.size
        if width * height > options.max_pixels:
            raise ItemError(
                f"image too large: {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{options.max_pixels} (--max-pixels)"
            )
        if options.draft_size and not options.exact and image.format == "JPEG":
            image.draft(image.mode, (options.draft_size, options.draft_size))
        image.load()
        return to_rgb(_upright(image))
    except ItemError:
        raise
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, MemoryError, NotImplementedError,
            OverflowError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as error:
        raise ItemError(_reason(error, options.allow_truncated)) from None
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
    """The item's image as upright RGB, or :class:`ItemError` with the reason."""
    if item.error:
        raise ItemError(item.error)
    if item.url is not None:
        data, content_type = fetch_url(item.url, fetch)
        return decode_image(io.BytesIO(data), decode, content_type)
    path = item.path
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ItemError("is a folder")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise ItemError("not a regular file")
        if info.st_size == 0:
            raise ItemError("empty file (0 bytes)")
        with open(path, "rb") as f:
            return decode_image(f, decode)
    except OSError as error:
        raise ItemError(_local_failure(path, error)) from None

