"""Bad input for the fault-injection tests: one maker per kind of bad slide file, and running `nic`
as a user does (a fresh interpreter; stdout and stderr kept apart)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile

from tests.conftest import DATA
from tests.io.helpers import CMU, TCGA_DICOM, TCGA_J2K, claim_size, damage_tiles, smooth_image, write_aperio_tiff

NIC = [sys.executable, "-m", "nic_pipeline"]
REPO = Path(__file__).resolve().parents[2]
NOISE = ("Traceback", "Error", "ERROR", "Exception", "Warning", "Corrupt JPEG data", "Premature end of JPEG")
"""What must not reach a user's terminal outside the one line per fault: tracebacks, worker error
logs, library warnings, libjpeg's warnings."""
OWN_LINES = ("FAILED ", "STOPPED: ", "error: ", "interrupted: ")
LOG = os.environ.get("NIC_FAULTS_LOG")
"""Set it to a file name to keep every command and its output (docs/reliability.md is copied from it)."""


def nic(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`nic ARGS` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    started = time.monotonic()
    done = subprocess.run([*NIC, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    log(done, time.monotonic() - started)
    return done


def log(done, seconds: float = 0.0) -> None:
    if LOG:
        with open(LOG, "a") as handle:
            handle.write(f"$ nic {' '.join(map(str, done.args[len(NIC):]))}\n# exit {done.returncode}, {seconds:.0f} s\n"
                         f"{done.stdout}{done.stderr}\n")


PORT_WARNING = re.compile(r"UserWarning: Port 8787 is already in use|Perhaps you already have a cluster running|"
                          r"Hosting the HTTP server on port|^\s+warnings.warn\($")
"""Distributed's 4-line warning when another cluster on the machine holds the dashboard port (the
embedded cluster asks for 8787): whether it shows depends on other programs, so the tests look past
it; docs/reliability.md lists it as a known rough edge."""


def noise(done) -> list[str]:
    """Lines of a run's output that a user should never see (the pipeline's own lines aside)."""
    lines = [line for line in (done.stdout + done.stderr).splitlines() if not PORT_WARNING.search(line)]
    return [line for line in lines if not line.startswith(OWN_LINES) and any(word in line for word in NOISE)]


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a refused command prints (asserting there is only one)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert not noise(done), done.stderr
    return errors[0]


# ---------------------------------------------------------------------------- bad slide files


def tissue_tiles(path: Path, n: int) -> list[int]:
    """Indices of the ``n`` largest level-0 JPEG tiles: those with the most texture, i.e. tissue,
    so that the tiles a read of the tissue touches are the damaged ones."""
    with tifffile.TiffFile(path) as tif:
        return sorted(np.argsort(np.asarray(tif.pages[0].databytecounts))[-n:].tolist())


def flat_slide(path: Path, rgb: np.ndarray) -> Path:
    """A pyramidal JPEG TIFF at 0.5 µm/px with Aperio metadata, whose pixels are ``rgb``."""
    return write_aperio_tiff(path, rgb, mpp=0.5, levels=3)


def grayscale(size: int = 2048) -> np.ndarray:
    """A textured but colourless image: tissue-like contrast, no stain colour."""
    gray = smooth_image(size)[..., :1].repeat(3, axis=2)
    return (gray // 2 + 60).astype(np.uint8)


def glass(size: int = 2048) -> np.ndarray:
    """Empty glass as a scanner sees it: near-white, faintly tinted, with sensor noise."""
    noise = np.random.default_rng(0).integers(-3, 4, (size, size, 1))
    return np.clip(np.array([238, 236, 241]) + noise, 0, 255).astype(np.uint8)


def copy(source: Path, path: Path) -> Path:
    shutil.copyfile(source, path)
    return path


def real_data(*parts: str) -> Callable[[], str | None]:
    """Why a kind made from the real slides beside the checkout cannot be made here (None: it can)."""
    return lambda: None if DATA.joinpath(*parts).exists() else f"real data not available: {DATA.joinpath(*parts)}"


def not_root() -> str | None:
    return "root reads any file, whatever its mode" if os.geteuid() == 0 else None


@dataclass(frozen=True)
class Kind:
    """One kind of bad input placed in the cohort folder: how to make it, and what the reason of
    its FAILED line must say."""

    name: str
    what: str
    make: Callable[[Path, Path], Path]  # (cohort folder, a good slide) -> the bad file
    reason: str
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot be made here


def _truncated(d: Path, good: Path) -> Path:
    (d / "truncated.svs").write_bytes(DATA.joinpath(*CMU).read_bytes()[:1_000_000])
    return d / "truncated.svs"


def _unreadable(d: Path, good: Path) -> Path:
    path = copy(good, d / "locked.tif")
    path.chmod(0)
    return path


def _cut_tiles(d: Path, good: Path) -> Path:
    (d / "cut.tif").write_bytes(good.read_bytes()[:-3000])
    return d / "cut.tif"


def _written(name: str, data: bytes):
    def make(d: Path, good: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name
    return make


def _copied(name: str, source: tuple[str, ...] | None = None):
    def make(d: Path, good: Path) -> Path:
        return copy(DATA.joinpath(*source) if source else good, d / name)
    return make


def _symlink(d: Path, good: Path) -> Path:
    (d / "gone.svs").symlink_to(d / "deleted-long-ago.svs")
    return d / "gone.svs"


def _fifo(d: Path, good: Path) -> Path:
    os.mkfifo(d / "pipe.svs")
    return d / "pipe.svs"


def _folder(d: Path, good: Path) -> Path:
    (d / "folder.svs").mkdir()
    return d / "folder.svs"


def _damaged(name: str, how: str):
    def make(d: Path, good: Path) -> Path:
        return damage_tiles(good, d / name, tissue_tiles(good, 4), how)
    return make


def _huge_header(d: Path, good: Path) -> Path:
    small = write_aperio_tiff(d.parent / "small-source.svs", smooth_image(512), levels=1)
    return claim_size(small, d / "huge.svs", 300_000, 300_000, fill_tiles=True)


def _short_tile_table(d: Path, good: Path) -> Path:
    small = write_aperio_tiff(d.parent / "small-source-2.svs", smooth_image(512), levels=1)
    return claim_size(small, d / "patched.svs", 300_000, 300_000, fill_tiles=False)


def _flat(name: str, image: Callable[[], np.ndarray]):
    def make(d: Path, good: Path) -> Path:
        return flat_slide(d / name, image())
    return make


def _tiny(d: Path, good: Path) -> Path:
    return write_aperio_tiff(d / "tiny.tif", smooth_image(100), mpp=0.5, levels=1)


KINDS = [
    Kind("truncated", "truncated TIFF (CMU-1-Small-Region.svs cut at 1 MB)", _truncated, "truncated or corrupt",
         real_data(*CMU)),
    Kind("tile-data-cut", "TIFF whose last tiles are cut off (3 kB short)", _cut_tiles, "truncated: image"),
    Kind("zero-bytes", "zero-byte file", _written("empty.svs", b""), "empty file (0 bytes)"),
    Kind("text", "text file named .svs", _written("notes.svs", b"just some text\n"), "must be a TIFF"),
    Kind("png-as-tif", "PNG image renamed .tif", _written("photo.tif", b"\x89PNG\r\n\x1a\n" + bytes(64)), "must be a TIFF"),
    Kind("tiff-no-ifd", "TIFF magic with no image directory", _written("header.svs", b"II*\x00\xff\xff\x00\x00" + bytes(32)),
         "corrupt"),
    Kind("text-dcm", "text file named .dcm", _written("notes2.dcm", b"not DICOM at all\n"), "not a DICOM file"),
    Kind("dicom", "non-conformant DICOM (TCGA-XK-AAJU, no PixelSpacing)",
         _copied("TCGA-XK-AAJU-01A-01-TS1_small_dicom.dcm", TCGA_DICOM),
         "not a conformant DICOM whole-slide image: missing", real_data(*TCGA_DICOM)),
    Kind("no-mpp", "no µm/px in the metadata (TCGA-CR-7395)", _copied("TCGA-CR-7395-01A-01-TS1.svs", TCGA_J2K),
         "no µm/px in its metadata; pass --mpp", real_data(*TCGA_J2K)),
    Kind("unreadable", "a slide file without read permission", _unreadable, "cannot read the file", not_root),
    Kind("dot-name", "a file named ..tif", _copied("..tif"), "slide id '.' is empty or only dots"),
    Kind("zarr-json-name", "a slide named zarr.json.tif", _copied("zarr.json.tif"), "collide with the store's own metadata"),
    Kind("reserved-name", "a slide named __meta.tif", _copied("__meta.tif"), "'__', which Zarr reserves"),
    Kind("dangling-symlink", "symbolic link to a deleted file", _symlink, "broken symbolic link"),
    Kind("fifo", "a named pipe called .svs", _fifo, "not a file (a device, pipe or socket)"),
    Kind("folder", "a folder called .svs", _folder, "not a file (a directory)"),
    Kind("duplicate-svs", "dup.svs beside dup.tif (one slide id)", _copied("dup.svs"), "slide id 'dup' is also the id of"),
    Kind("duplicate-tif", "dup.tif beside dup.svs (one slide id)", _copied("dup.tif"), "slide id 'dup' is also the id of"),
    Kind("corrupt-tiles", "bytes flipped in 4 tissue JPEG tiles", _damaged("flipped.tif", "flip"), "corrupt JPEG tile at level"),
    Kind("zeroed-tiles", "first 600 bytes of 4 tissue JPEG tiles zeroed", _damaged("zeroed.tif", "zero"),
         "corrupt JPEG tile at level"),
    Kind("huge-header", "300,000 x 300,000 px header on an 11 MB file", _huge_header, "implausible size: image 0 claims 300000"),
    Kind("short-tile-table", "300,000 px header over a 4-tile table", _short_tile_table, "but lists 4 tile offsets"),
    Kind("grayscale", "grayscale slide (no stain colour)", _flat("gray.tif", grayscale), "the slide is grayscale"),
    Kind("blank", "blank glass, near-white with a faint tint (no tissue)", _flat("glass.tif", glass), "the slide looks blank"),
    Kind("white", "uniform white slide, R = G = B (no tissue)",
         _flat("white.tif", lambda: np.full((2048, 2048, 3), 245, np.uint8)), "no tissue found at 8 µm/px"),
    Kind("smaller-than-patch", "100 x 100 px slide", _tiny, "smaller than one 128 px patch"),
]
