"""Fetch, and slim, the wheels that benchmarks/gpu.py needs on the lent GPU machine.

    python benchmarks/gpu_wheels.py [--dest .whl]

The device machine (Python 3.12, CUDA 13, PyTorch, CuPy, NumPy, SciPy, scikit-image, pandas, tifffile
... preinstalled; nothing can be fetched there) lacks Dask, Zarr, cuCIM and the codecs. They
travel as wheels in ``.whl/`` (git-ignored), 64 MiB together with the working tree. Three wheels
alone would fill that, so the parts nothing here uses are cut out of them: cuCIM's test data,
nvImageCodec's modules for other Pythons and its codecs whose CUDA libraries do not travel
(OpenCV, nvJPEG2000, nvTIFF), and every imagecodecs codec but the JPEG/deflate/zstd/LZW ones
(tifffile writes and reads JPEG tiles with it). Run it on the development machine; the device
README's recipe then installs ``.whl/*.whl`` into /tmp/site (benchmarks/gpu-run.sh does).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64

WHEELS = {
    # the GPU reader: cuCIM 26.06 is the last built against nvImageCodec 0.8 (26.08 needs >= 0.9,
    # whose GPU JPEG region decoding fails: NVIDIA/nvImageCodec#55)
    "cucim-cu13": "26.6.0",
    "nvidia-nvimgcodec-cu13": "0.8.0.22",
    "nvidia-nvjpeg": "13.0.1.86",  # libnvjpeg.so.13, which nvImageCodec's GPU JPEG decoder loads
    # Dask, at the versions dask-cuda 26.10 is released for
    "dask": "2026.7.1",
    "distributed": "2026.7.1",
    "dask-cuda": "26.10.0",
    "tornado": "6.6.1",
    "tblib": "3.2.2",
    "zict": "3.0.0",
    "partd": "1.4.2",
    "locket": "1.0.0",
    # the store
    "zarr": "3.1.6",
    "numcodecs": "0.16.6",
    "donfig": "0.8.1.post1",
    "google-crc32c": "1.9.0",
    # slide files
    "imagecodecs": "2026.3.6",
    "simplejpeg": "1.9.0",
    "openslide-python": "1.4.7",
    "openslide-bin": "4.0.1.2",
    "pydicom": "3.0.2",
}
"""Each wheel and its version (one of each: two versions of one name stop the install)."""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"]

IMAGECODECS_KEEP = {"_shared", "_shared_cython", "_imcd", "_jpeg8", "_zlib", "_deflate", "_zstd", "_png"}
NVIMGCODEC_DROP = re.compile(r"extensions/lib(opencv|nvjpeg2k|nvtiff)_ext|nvimgcodec_impl\.cpython-(?!312-)")
TESTS = re.compile(r"(^|/)tests?/")


def download(dest: Path) -> list[Path]:
    """``pip download`` each wheel for CPython 3.12 on x86-64 Linux, without dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in WHEELS.items():
        if not list(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                            f"{name}=={version}"], check=True)
    return sorted(dest.glob("*.whl"))


def elf_needed(data: bytes) -> set[str]:
    """The shared libraries an ELF file names as NEEDED (by readelf)."""
    with tempfile.NamedTemporaryFile(suffix=".so") as handle:
        handle.write(data)
        handle.flush()
        shown = subprocess.run(["readelf", "-d", handle.name], capture_output=True, text=True).stdout
    return set(re.findall(r"\(NEEDED\).*\[(.+?)\]", shown))


def imagecodecs_drop(names: list[str], read) -> set[str]:
    """The imagecodecs members to leave out: codec modules not kept and the libraries only they need."""
    modules = {n for n in names if re.match(r"imagecodecs/_\w+\.abi3\.so$", n)}
    kept = {n for n in modules if n.split("/")[1].split(".")[0] in IMAGECODECS_KEEP}
    libs = {n.split("/")[-1]: n for n in names if n.startswith("imagecodecs.libs/")}
    needed, todo = set(), list(kept)
    while todo:
        for lib in elf_needed(read(todo.pop())) & set(libs) - needed:
            needed.add(lib)
            todo.append(libs[lib])
    return (modules - kept) | {path for lib, path in libs.items() if lib not in needed}


def slim(wheel: Path) -> int:
    """Rewrite ``wheel`` without what nothing here uses; returns the bytes saved."""
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        if wheel.name.startswith("imagecodecs-"):
            drop = imagecodecs_drop(names, source.read)
        elif wheel.name.startswith("nvidia_nvimgcodec"):
            drop = {n for n in names if NVIMGCODEC_DROP.search(n)}
        elif wheel.name.startswith(("cucim", "numcodecs")):
            drop = {n for n in names if TESTS.search(n)}
        else:
            return 0
        if not drop:
            return 0
        before = wheel.stat().st_size
        slimmed = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if info.filename in drop:
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",")[0] not in drop).encode()
                target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    slimmed.replace(wheel)
    return before - wheel.stat().st_size


def tree_bytes() -> int:
    """Bytes of the files that travel with the working tree (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = parser.parse_args()
    if shutil.which("readelf") is None:
        sys.exit("readelf (binutils) is needed to slim imagecodecs")
    wheels = download(args.dest)
    stale = [w.name for w in wheels if not any(w.name.startswith(f"{n.replace('-', '_')}-{v}-") for n, v in WHEELS.items())]
    if stale:
        sys.exit(f"{args.dest} holds wheels not in the list (remove them): {', '.join(stale)}")
    saved = sum(slim(w) for w in wheels)
    total = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB ({saved / 2**20:.1f} MiB cut); working tree "
          f"{tree / 2**20:.1f} MiB; together {(total + tree) / 2**20:.1f} of {LIMIT_MIB} MiB")
    if total + tree > LIMIT_MIB * 2**20:
        sys.exit("too large to travel: trim the working tree or the wheels")


if __name__ == "__main__":
    main()
