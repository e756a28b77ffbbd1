"""TIFF-based slides at the byte level: the image directories (tifffile), checks that a file can
back what its header claims, and strict decoding of the JPEG tiles a read touches.

Both readers decode JPEG with libjpeg(-turbo), which treats corrupt entropy data ("Corrupt JPEG
data: bad Huffman code", "premature end of data segment") as a *warning*: cuCIM prints it and
returns black or garbage pixels. So before a region is read, each JPEG tile under it is decoded
once with libjpeg-turbo in strict mode (simplejpeg, warnings raise), scaled 1/8 and gray so that
only the entropy decoding, which is what finds corruption, costs time; the verdict is kept per
tile. Where the strict decode can give the pixels themselves (one region on the CPU, YCbCr
tiles), the region is decoded here from its tiles instead: the check and the read in one
decode. See docs/slides.md (Corrupt tiles) for what it finds and what it costs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import simplejpeg
import tifffile

from nic_pipeline.errors import SlideError

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
JPEG = 7  # TIFF Compression tag value of (new-style) JPEG
YCBCR = 6  # TIFF PhotometricInterpretation of JPEG tiles that libjpeg decodes to RGB by itself
MAX_COMPRESSION = 10_000
"""The most a slide's level 0 can be compressed (RGB bytes : file bytes). Whole slides in JPEG reach
about 50:1, blank JPEG tiles about 200:1, deflate at most about 1000:1; a header claiming more than
10,000:1 describes pixels that the file cannot hold (e.g. 300,000 x 300,000 px in 11 MB)."""
PARALLEL_FROM = 16  # unchecked tiles under one read from which the check runs on all cores
LIBJPEG_CORRUPTION = re.compile(r"Corrupt JPEG data|Premature end of JPEG file")


@dataclass(frozen=True)
class TiffImage:
    """One image directory: its size, tiling, codec and where its tiles or strips lie."""

    index: int
    width: int
    height: int
    tile: tuple[int, int] | None  # (width, height) of a tile; None for strips
    compression: int
    offsets: np.ndarray
    counts: np.ndarray
    jpegtables: bytes | None
    planes: int  # separately stored sample planes (1 unless PlanarConfiguration is 2)
    photometric: int  # PhotometricInterpretation: how the JPEG tiles code colour
    samples: int
    bits: int = 8  # BitsPerSample

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(columns, rows) of tiles."""
        return math.ceil(self.width / self.tile[0]), math.ceil(self.height / self.tile[1])

    @property
    def data_end(self) -> int:
        """Byte offset just past the last strip or tile."""
        present = self.counts > 0
        return int((self.offsets[present] + self.counts[present]).max(initial=0))


# ---------------------------------------------------------------------------- reading the layout


def read_tiff_images(path: Path) -> list[TiffImage]:
    """The image directories of a TIFF; a SlideError when tifffile cannot parse it."""
    stat = path.stat()
    return _read_tiff_images(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_tiff_images(path: str, mtime_ns: int, size: int) -> list[TiffImage]:
    """Cached on (path, mtime, size): open_slide checks the file, then the tile check reuses it."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its warnings would duplicate our message
    try:
        with tifffile.TiffFile(path) as tif:
            return [_image(index, page) for index, page in enumerate(tif.pages)]
    except Exception as err:
        raise SlideError(path, f"corrupt TIFF: {err}") from None
    finally:
        logger.setLevel(level)


def _image(index: int, page) -> TiffImage:
    return TiffImage(
        index=index,
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile=(int(page.tilewidth), int(page.tilelength)) if page.is_tiled else None,
        compression=int(page.compression),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        counts=np.asarray(page.databytecounts, dtype=np.int64),
        jpegtables=bytes(page.jpegtables) if page.jpegtables is not None else None,
        planes=int(page.samplesperpixel) if int(page.planarconfig) == 2 else 1,
        photometric=int(page.photometric),
        samples=int(page.samplesperpixel),
        bits=int(page.bitspersample),
    )


# ---------------------------------------------------------------------------- checks at open


def check_tiff(path: Path):
    """SlideError unless ``path`` is a TIFF whose directories and data lie inside the file and
    whose size claims the file can back (tile counts, compression ratio)."""
    with path.open("rb") as handle:
        header = handle.read(4)
    if header not in TIFF_MAGIC:
        raise SlideError(path, f"not a slide: a {path.suffix} file must be a TIFF, but it starts with {header!r}")
    size = path.stat().st_size
    images = read_tiff_images(path)
    if not images:
        raise SlideError(path, f"truncated or corrupt: no image directory within its {size} bytes")
    for image in images:
        if image.data_end > size:
            raise SlideError(path, f"truncated: image {image.index} needs {image.data_end} bytes but the file has {size}")
        _check_tile_count(path, image)
    _check_compression_ratio(path, max(images, key=lambda image: image.width * image.height), size)
    if any(image.bits == 16 for image in images):
        _check_sample_range(path)


RANGE_CHECK_PIXELS = 4096 * 4096
"""The largest image read whole to find a 16-bit slide's range (its smallest pyramid level)."""


def _check_sample_range(path: Path):
    """SlideError for 16-bit samples that hold 12-bit (or narrower) data: the readers keep the top
    8 bits of each sample, which are then at most 15 of 255, an all but black slide that tissue
    detection would call blank."""
    stat = path.stat()
    largest = _largest_sample(str(path), stat.st_mtime_ns, stat.st_size)
    if largest is not None and 0 < largest < 1 << 12:
        raise SlideError(path, f"16-bit samples holding {largest.bit_length()}-bit data (largest value {largest} "
                               "of 65535): read at 8 bits (the top 8 of 16) the slide is all but black; "
                               "scale it to the full 16-bit range, or to 8 bits, first")


@functools.lru_cache(maxsize=8)
def _largest_sample(path: str, mtime_ns: int, size: int) -> int | None:
    """The largest sample value of the smallest 16-bit image of a TIFF (its SMaxSampleValue tag
    when that image is too large to read here), or None when neither tells."""
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [page for page in tif.pages if int(page.bitspersample) == 16]
            page = min(pages, key=lambda page: int(page.imagewidth) * int(page.imagelength))
            if int(page.imagewidth) * int(page.imagelength) <= RANGE_CHECK_PIXELS:
                return int(page.asarray().max())
            tag = page.tags.get("SMaxSampleValue")
            return int(np.max(tag.value)) if tag is not None else None
    except Exception:  # noqa: BLE001 - a page that does not decode is the readers' to report
        return None


def _check_tile_count(path: Path, image: TiffImage):
    if image.tile is None or 0 in image.tile:
        return
    columns, rows = image.tile_grid
    expected = columns * rows * image.planes
    if len(image.offsets) != expected:
        raise SlideError(
            path,
            f"corrupt: image {image.index} claims {image.width} x {image.height} px in {image.tile[0]} x "
            f"{image.tile[1]} px tiles ({expected} tiles) but lists {len(image.offsets)} tile offsets",
        )


def _check_compression_ratio(path: Path, image: TiffImage, size: int):
    claimed = image.width * image.height * 3
    if claimed > MAX_COMPRESSION * size:
        raise SlideError(
            path,
            f"implausible size: image {image.index} claims {image.width} x {image.height} px "
            f"({claimed / 1e9:.1f} GB as RGB) but the file has {size / 1e6:.1f} MB, a {claimed // size}:1 "
            f"compression (slides reach well under {MAX_COMPRESSION}:1); its header or tile table is corrupt",
        )


# ---------------------------------------------------------------------------- JPEG tiles under a read


class CorruptTile(ValueError):
    """A JPEG tile that does not decode cleanly."""


class JpegTiles:
    """The tiled JPEG levels of a slide, decoded strictly: :meth:`check` decodes each tile under a
    read once and raises :class:`CorruptTile` for a bad one (again on every later read that
    touches it); :meth:`read` decodes a region from its tiles, checking them as it goes."""

    def __init__(self, path: Path, images: dict[int, TiffImage], downsamples):
        self._fd = os.open(path, os.O_RDONLY)
        self._images = images
        self._downsamples = [float(d) for d in downsamples]
        self._good = {level: np.zeros(image.tile_grid[::-1], dtype=bool) for level, image in images.items()}
        self._bad: dict[tuple[int, int, int], str] = {}

    @classmethod
    def for_levels(cls, path: Path, level_dimensions, downsamples) -> "JpegTiles | None":
        """The check for the pyramid levels stored as tiled JPEG in ``path``; None when there are none."""
        images = jpeg_levels(read_tiff_images(path), level_dimensions)
        return cls(path, images, downsamples) if images else None

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def check(self, locations, size, level: int):
        """CorruptTile if any JPEG tile under the regions (level-0 ``locations``, ``size`` at
        ``level``) is corrupt: the first in row order. Many new tiles are checked on all cores."""
        image = self._images.get(level)
        if image is None:
            return
        tiles = sorted(self._tiles_under(image, locations, size, level))
        check = functools.partial(self._verdict, image, level)
        verdicts = _pool(os.getpid()).map(check, tiles) if len(tiles) >= PARALLEL_FROM else map(check, tiles)
        for problem in verdicts:
            if problem:
                raise CorruptTile(problem)

    def _tiles_under(self, image: TiffImage, locations, size, level: int) -> set[tuple[int, int]]:
        """(row, column) of every unchecked tile that the regions overlap, clipped to the image."""
        downsample = self._downsamples[level]
        (tile_w, tile_h), (columns, rows) = image.tile, image.tile_grid
        tiles = set()
        for x, y in locations:
            left, top = x / downsample, y / downsample
            c0, c1 = max(0, math.floor(left) // tile_w), min(columns - 1, (math.ceil(left) + size[0] - 1) // tile_w)
            r0, r1 = max(0, math.floor(top) // tile_h), min(rows - 1, (math.ceil(top) + size[1] - 1) // tile_h)
            tiles.update((r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))
        return {(r, c) for r, c in tiles if not self._good[level][r, c]}

    def _verdict(self, image: TiffImage, level: int, tile: tuple[int, int]) -> str | None:
        """Why the tile at (row, column) is corrupt, or None; decoded once, remembered."""
        row, column = tile
        key = (level, column, row)
        if key not in self._bad:
            offset, data = self._tile_bytes(image, tile)
            problem = jpeg_problem(data, image.jpegtables) if data else None
            if problem is None:
                self._good[level][row, column] = True
                return None
            self._bad[key] = self._corrupt(level, tile, offset, problem)
        return self._bad[key]

    def read(self, location, size, level: int) -> np.ndarray | None:
        """The region of ``size`` (w, h) at ``level`` (``location`` in level-0 px) as (1, h, w, 3)
        uint8, decoded strictly from its tiles (many tiles on all cores); CorruptTile for a bad
        one. None where this cannot give the reader's pixels (another codec or colour space, a
        region not on whole level pixels or beyond the image, a missing tile): read it elsewhere.

        libjpeg-turbo with its default (accurate) DCT and upsampling, as cuCIM and OpenSlide
        decode; YCbCr tiles only, since libjpeg would take RGB-coded tiles (Aperio) for YCbCr.
        """
        image = self._images.get(level)
        if image is None or image.photometric != YCBCR or image.samples != 3 or image.planes != 1:
            return None
        left, top = location[0] / self._downsamples[level], location[1] / self._downsamples[level]
        (width, height), (tile_w, tile_h) = size, image.tile
        if not (left.is_integer() and top.is_integer() and left >= 0 and top >= 0
                and left + width <= image.width and top + height <= image.height):
            return None
        left, top = int(left), int(top)
        tiles = [(r, c) for r in range(top // tile_h, (top + height - 1) // tile_h + 1)
                 for c in range(left // tile_w, (left + width - 1) // tile_w + 1)]
        if any(image.counts[r * image.tile_grid[0] + c] == 0 for r, c in tiles):
            return None
        decode = functools.partial(self._decode, image, level)
        pixels = _pool(os.getpid()).map(decode, tiles) if len(tiles) >= PARALLEL_FROM else map(decode, tiles)
        region = np.empty((height, width, 3), np.uint8)
        for (row, column), tile in zip(tiles, pixels):
            if tile.shape != (tile_h, tile_w, 3):
                return None
            y0, x0 = max(top, row * tile_h), max(left, column * tile_w)
            y1, x1 = min(top + height, (row + 1) * tile_h), min(left + width, (column + 1) * tile_w)
            region[y0 - top:y1 - top, x0 - left:x1 - left] = tile[y0 - row * tile_h:y1 - row * tile_h,
                                                                  x0 - column * tile_w:x1 - column * tile_w]
        return region[None]

    def _decode(self, image: TiffImage, level: int, tile: tuple[int, int]) -> np.ndarray:
        """RGB pixels of the tile at (row, column), decoded strictly; CorruptTile for a bad one."""
        row, column = tile
        key = (level, column, row)
        if key in self._bad:
            raise CorruptTile(self._bad[key])
        offset, data = self._tile_bytes(image, tile)
        pixels, problem = jpeg_decode_strict(data, image.jpegtables)
        if problem is not None:
            self._bad[key] = self._corrupt(level, tile, offset, problem)
            raise CorruptTile(self._bad[key])
        self._good[level][row, column] = True
        return pixels

    def _tile_bytes(self, image: TiffImage, tile: tuple[int, int]) -> tuple[int, bytes]:
        """(file offset, bytes) of the tile at (row, column)."""
        index = tile[0] * image.tile_grid[0] + tile[1]
        offset, count = int(image.offsets[index]), int(image.counts[index])
        return offset, os.pread(self._fd, count, offset) if count else b""

    @staticmethod
    def _corrupt(level: int, tile: tuple[int, int], offset: int, problem: str) -> str:
        return f"corrupt JPEG tile at level {level}, tile ({tile[1]}, {tile[0]}) at byte {offset}: {problem}"


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """Threads for checking many tiles at once (libjpeg-turbo decodes without the GIL); one pool
    per process id, since a forked child inherits the pool but not its threads."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="jpeg-tile-check")


def jpeg_levels(images: list[TiffImage], level_dimensions) -> dict[int, TiffImage]:
    """Pyramid level -> the tiled JPEG image directory of the same size (in file order)."""
    free = [image for image in images if image.tile and image.compression == JPEG]
    levels = {}
    for level, (width, height) in enumerate(level_dimensions):
        match = next((image for image in free if (image.width, image.height) == (width, height)), None)
        if match is not None:
            levels[level] = match
            free.remove(match)
    return levels


def jpeg_problem(data: bytes, tables: bytes | None = None) -> str | None:
    """Why a JPEG tile does not decode cleanly, or None when it does (gray at 1/8 scale: the
    entropy decoding in full, the inverse DCT and colour conversion skipped)."""
    return _strict(data, tables, colorspace="gray", min_factor=8)[1]


def jpeg_decode_strict(data: bytes, tables: bytes | None = None) -> tuple[np.ndarray | None, str | None]:
    """(RGB pixels, None) of a JPEG tile that decodes cleanly, or (None, why it does not)."""
    return _strict(data, tables, colorspace="rgb")


def _strict(data: bytes, tables: bytes | None, **options) -> tuple[np.ndarray | None, str | None]:
    """Decode with libjpeg-turbo in strict mode, which finds corrupt entropy data; a stream it
    merely declines (an unusual subsampling, a benign warning) counts as corrupt only if libjpeg
    (imagecodecs) also fails on it."""
    if tables:
        data = tables[:-2] + data[2:]  # abbreviated stream: splice in the shared tables (minus EOI/SOI)
    try:
        return simplejpeg.decode_jpeg(data, strict=True, **options), None
    except Exception as err:  # simplejpeg raises ValueError; anything else is as bad
        strict = str(err)
    if LIBJPEG_CORRUPTION.search(strict):
        return None, strict
    try:
        return imagecodecs.jpeg8_decode(data), None
    except Exception as err:
        return None, str(err)
