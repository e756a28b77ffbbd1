"""The compressed-slide store: one Zarr v3 group per slide, readable as an xarray Dataset.

Layout of ``STORE.zarr``::

    zarr.json                root attributes: compression settings, failed slides, run manifests
    _index/*.jsonl           one line per finished slide, appended as slides finish: what
                             listing and opening the cohort need (:mod:`.index`)
    <slide_id>/zarr.json     the slide's settings, source, µm/px and its origin, grid, status,
                             and the device and precision each block was encoded with
    <slide_id>/features      (feature, y, x) float16; ONE shard file per block of cells, inner
                             chunks of 32 x 32 cells, zstd + crc32c; 0 where not encoded
    <slide_id>/tissue        (y, x) float32 tissue fraction per cell, one chunk
    <slide_id>/y, x          cell centres in µm, one chunk each

A slide is about 7 files plus one per block that holds tissue: no marker files, whatever the
slide's size (the file count matters to Lustre/GPFS metadata servers at 10,000 slides). A block
is done when its shard exists: Zarr's local store writes every file under a temporary name and
renames it, so a shard is whole or absent. Every chunk carries a crc32c checksum, checked on
read. A slide becomes ``complete`` only after every block with tissue is written; its attributes
then record each shard's size, so a rerun notices deleted or truncated shards without reading
them (``verify`` reads them all and checks the checksums too).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import cpu as cpu_buffer
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from nic_pipeline.compress.grid import DEFAULT_BLOCK, DEFAULT_MIN_TISSUE, Block, Grid, iter_blocks
from nic_pipeline.compress.tissue import DEFAULT_MASK_MPP
from nic_pipeline.errors import NicError

COMPLETE = "complete"
IN_PROGRESS = "in-progress"
MISSING = "missing"
FAILED = "failed"
CHUNK = 32
"""Cells per side of an inner chunk: what a training crop reads at the least."""
_CODECS = [ZstdCodec(level=3), Crc32cCodec()]
try:
    NIC_VERSION = version("nic-pipeline")
    """The installed distribution's version, recorded with every store and slide."""
except PackageNotFoundError:  # pragma: no cover - a source tree without install
    NIC_VERSION = "0.0.0+unknown"


@dataclass(frozen=True)
class CompressionConfig:
    """Everything that decides the numbers in a store; two runs must agree on all of it.

    ``precision`` is the policy asked for (``auto``: each worker picks from its hardware); what
    each block actually ran with is recorded per block in the slide's attributes.
    """

    encoder: str
    encoder_sha256: str
    code_dim: int
    mpp: float
    patch_size: int
    stride: int
    block: int = DEFAULT_BLOCK
    min_tissue: float = DEFAULT_MIN_TISSUE
    mask_mpp: float = DEFAULT_MASK_MPP
    precision: str = "auto"
    dihedral_mean: bool = False
    stain_norm: str = "none"  # none | macenko | reinhard (pipeline/compress/stain.py)
    stain_reference: str = ""  # where the stain target came from: a reference file or "cohort"
    stain_target: tuple[float, ...] = ()  # the target stain's numbers

    def as_attrs(self) -> dict:
        """JSON-ready settings; the stain ones only when stain normalisation is on (stores made
        without it read the same as before)."""
        attrs = asdict(self)
        if self.stain_norm == "none":
            for key in ("stain_norm", "stain_reference", "stain_target"):
                attrs.pop(key)
        else:
            attrs["stain_target"] = list(self.stain_target)
        return attrs


SAMPLE_BYTES = 1 << 20
"""Bytes hashed at each end of the file by the fingerprint of stores made before the whole-file one."""
READ_BYTES = 8 << 20


def file_crc32c(path: str | os.PathLike) -> str:
    """crc32c of the whole file, in 8 MiB reads (hardware crc32c: about the speed of reading the file,
    docs/reliability.md "Source files changed in place")."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_BYTES):
            crc = google_crc32c.extend(crc, chunk)
    return f"{crc:08x}"


def _head_tail_sha256(path: Path, size: int) -> str:
    """The fingerprint of stores made before the whole-file one: sha256 of the size and the first
    and last MiB (kept to read those stores)."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            handle.seek(max(size - SAMPLE_BYTES, SAMPLE_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()


def source_fingerprint(path: str | os.PathLike) -> dict:
    """Size, mtime and ``crc32c:<hex>`` of the whole file: any change to its bytes (a re-scan,
    a truncation, a replacement, 64 bytes rewritten in place) changes it, except with probability
    2**-32 for changes that are not one burst of at most 32 bits."""
    path = Path(path)
    stat = path.stat()
    return {"source_path": str(path.resolve()), "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns, "source_fingerprint": f"crc32c:{file_crc32c(path)}"}


def _fingerprint_like(recorded: str | None, path: Path, size: int) -> str:
    """The file's fingerprint made the way ``recorded`` was (whole-file crc32c, or the head-and-tail
    sha256 of older stores)."""
    if recorded and not recorded.startswith("crc32c:"):
        return _head_tail_sha256(path, size)
    return f"crc32c:{file_crc32c(path)}"


def source_changed(attrs: dict, path: str | os.PathLike, full: bool = False) -> bool:
    """Whether the file at ``path`` differs from the one a slide was made from.

    Cheap by default: an unchanged size and mtime mean unchanged, and only a file whose size or
    mtime changed is hashed. ``full`` (``--verify``, ``--redo-changed``) hashes the whole file
    whatever its mtime says, to catch a change written with the old mtime restored."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size != attrs.get("source_size"):
        return True
    if stat.st_mtime_ns == attrs.get("source_mtime_ns") and not full:
        return False
    recorded = attrs.get("source_fingerprint")
    return _fingerprint_like(recorded, path, stat.st_size) != recorded


def same_source(recorded: str | None, fingerprint: dict) -> bool:
    """Whether a slide group's recorded fingerprint names the file ``fingerprint`` describes."""
    if recorded == fingerprint["source_fingerprint"]:
        return True
    if not recorded or recorded.startswith("crc32c:") or not Path(fingerprint["source_path"]).is_file():
        return False
    return _head_tail_sha256(Path(fingerprint["source_path"]), fingerprint["source_size"]) == recorded


def open_store(path: str | os.PathLike, config: CompressionConfig) -> zarr.Group:
    """Open or create a cohort store for writing with ``config``; refuse one made with other settings."""
    try:
        root = zarr.open_group(str(path), mode="a", zarr_format=3, use_consolidated=False)
    except (zarr.errors.ContainsArrayError, ValueError, OSError) as err:
        raise NicError(f"{path}: cannot open as a Zarr store for writing ({err})") from err
    _drop_consolidated(root)
    existing = root.attrs.get("compression")
    wanted = config.as_attrs()
    if existing is None:
        root.attrs.update({"compression": wanted, "nic_version": NIC_VERSION})
    elif existing != wanted:
        changed = sorted(k for k in {*wanted, *existing} if existing.get(k) != wanted.get(k))
        details = ", ".join(f"{k}: store has {existing.get(k)!r}, this run {wanted.get(k)!r}" for k in changed)
        resume = (f", or pass --encoder {existing['encoder']} to finish it with the encoder it was made with"
                  if "encoder" in changed and existing.get("encoder") else "")
        raise NicError(
            f"{path} was written with other compression settings ({details}); "
            f"write to a new store (--out) instead of mixing them{resume}"
        )
    return root


def _drop_consolidated(root: zarr.Group) -> None:
    """Remove the consolidated copy of every slide's metadata that older versions wrote into the
    root's ``zarr.json`` at the end of each run: this run changes the slides, and the copy would
    go stale (and it grows with the cohort, about 6 MB per 1,000 slides)."""
    found = sync(root.store.get("zarr.json", prototype=default_buffer_prototype()))
    if found is not None and b'"consolidated_metadata"' in found.to_bytes():
        root.attrs.put(dict(root.attrs))  # rewrites the zarr.json of a group opened without the copy


def open_cohort(path: str | os.PathLike) -> zarr.Group:
    """The store's root for reading; each slide's group is read from its own metadata when asked
    for (never from a consolidated copy, which a later run would have left stale)."""
    try:
        return zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as err:
        raise NicError(f"{path}: not a compressed-slide store ({err})") from err


def slide_status(root: zarr.Group, slide_id: str) -> str:
    """``missing``, ``in-progress`` or ``complete``."""
    if slide_id not in root:
        return MISSING
    return root[slide_id].attrs.get("status", IN_PROGRESS)


def open_slide_group(store: str, slide_id: str, mode: str = "r+") -> zarr.Group:
    """One slide's group, read straight from its own metadata (never a stale consolidated copy)."""
    return zarr.open_group(store, path=slide_id, mode=mode, zarr_format=3, use_consolidated=False)


def find_slide_group(store, slide_id: str, mode: str = "r+") -> zarr.Group | None:
    """A slide's group, opened alone (never the root, whose consolidated metadata grows with the
    cohort), or None when there is none."""
    try:
        return zarr.open_group(store, path=slide_id, mode=mode, zarr_format=3, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None


def create_slide(root, slide_id: str, grid: Grid, config: CompressionConfig,
                 tissue: np.ndarray, attrs: dict) -> zarr.Group:
    """Create the group of one slide, or reuse it when it was made from the same file and grid.

    ``root``: the store's root group or its path (only the slide's own folder is read). Creation
    is resumable: the ``status`` attribute is written last, so a group without it was interrupted
    while being made (it holds no codes yet) and is made again, as is a folder that lost its
    zarr.json.
    """
    if isinstance(root, zarr.Group):
        store, path = root.store, child_path(root, slide_id)
    else:
        store, path = str(root), slide_id
    group = find_slide_group(store, path)
    if group is not None and "status" in group.attrs:
        if same_source(group.attrs.get("source_fingerprint"), attrs) and tuple(
            group.attrs.get("grid_shape", ())
        ) == grid.shape:
            return group
        raise NicError(
            f"{attrs['source_path']}: the store already holds a different slide named {slide_id!r} "
            "(file, µm/px or grid changed); pass --redo-changed to compress it again"
        )
    group = zarr.open_group(store, path=path, mode="w", zarr_format=3)  # "w": clears a half-made folder
    ny, nx = grid.shape
    block, chunk = config.block, math.gcd(config.block, CHUNK)
    group.create_array(
        "features", shape=(config.code_dim, ny, nx), chunks=(config.code_dim, chunk, chunk),
        shards=(config.code_dim, block, block), dtype="float16", fill_value=0,
        compressors=_CODECS, dimension_names=("feature", "y", "x"),
    )
    group.create_array(
        "tissue", shape=(ny, nx), chunks=(ny, nx), dtype="float32", fill_value=0,
        compressors=_CODECS, dimension_names=("y", "x"),
    )[...] = tissue.astype(np.float32)
    for name, values in zip(("y", "x"), grid.coords_um()):
        coord = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=(name,),
                                   compressors=_CODECS)
        coord[...] = values
        coord.attrs["units"] = "µm"
    group.attrs.update({**config.as_attrs(), **attrs, "slide_mpp": grid.slide_mpp, "grid_shape": list(grid.shape),
                        "nic_version": NIC_VERSION, "status": IN_PROGRESS})
    return group


def remove_slide(store: str, slide_id: str) -> None:
    """Delete a slide's group (to compress a changed slide again)."""
    zarr.open_group(store, path=slide_id, mode="w", zarr_format=3)


def blocks_with_tissue(tissue: np.ndarray, block: int, min_tissue: float) -> list[tuple[Block, int]]:
    """The blocks that hold cells to encode, with their number of such cells."""
    cells = tissue >= min_tissue
    found = []
    for blk in iter_blocks(tissue.shape, block):
        n = int(cells[blk.slices].sum())
        if n:
            found.append((blk, n))
    return found


MIN_BLOCKS, MAX_SPLIT_BLOCKS = 8, 12
"""A slide with fewer than MIN_BLOCKS blocks of tissue gets smaller blocks (halved down to one
inner chunk), so that one slide alone keeps several workers busy, but never more than
MAX_SPLIT_BLOCKS of them: a small slide stays at a handful of files."""


def slide_block(tissue: np.ndarray, largest: int, min_tissue: float) -> int:
    """The block side for one slide: ``largest``, halved while the slide has fewer than
    :data:`MIN_BLOCKS` blocks with tissue and halving gives at most :data:`MAX_SPLIT_BLOCKS`.

    It depends on the slide alone (never on the cluster), so every run of a slide lays the same
    blocks and writes the same bytes.
    """
    block = largest
    while block % 2 == 0 and block // 2 >= CHUNK and len(blocks_with_tissue(tissue, block, min_tissue)) < MIN_BLOCKS:
        if len(blocks_with_tissue(tissue, block // 2, min_tissue)) > MAX_SPLIT_BLOCKS:
            break
        block //= 2
    return block


def _shard_key(group: zarr.Group, block: Block) -> str:
    features = group["features"]
    return f"{features.store_path.path}/{features.metadata.encode_chunk_key((0, *block.index))}"


def shard_size(group: zarr.Group, block: Block) -> int | None:
    """Bytes of a block's shard file, or None when it is not written."""
    return sync(group.store.getsize(_shard_key(group, block))) if block_done(group, block) else None


def block_done(group: zarr.Group, block: Block) -> bool:
    """Whether the block's shard exists (shards are written whole or not at all)."""
    return sync(group.store.exists(_shard_key(group, block)))


def write_block(group: zarr.Group, block: Block, features: np.ndarray, record: dict | None = None) -> None:
    """Write one block's codes (code_dim, h, w): exactly one shard file, written atomically.

    ``record`` (how the block was encoded) goes first into a small file that
    :func:`mark_complete` folds into the slide's attributes and deletes: written before the shard,
    it is never missing for a block that is done.
    """
    if record is not None:
        sync(group.store.set(_record_key(group, block), cpu_buffer.Buffer.from_bytes(json.dumps(record).encode())))
    group["features"][(slice(None), *block.slices)] = features.astype(np.float16)


def _record_key(group: zarr.Group, block: Block) -> str:
    """Beside the shards, inside the features array's folder: no Zarr node, so listing the
    hierarchy never trips over it."""
    return f"{group['features'].store_path.path}/_blocks/{block_name(block)}.json"


def _read_record(group: zarr.Group, block: Block) -> dict:
    found = sync(group.store.get(_record_key(group, block), prototype=default_buffer_prototype()))
    return json.loads(found.to_bytes()) if found is not None else {}


def mark_complete(group: zarr.Group) -> None:
    """Mark the slide complete once every block with tissue is written; record each shard's size
    and how each block was encoded."""
    attrs = group.attrs
    todo = blocks_with_tissue(group["tissue"][...], attrs["block"], attrs["min_tissue"])
    missing = [blk.index for blk, _ in todo if not block_done(group, blk)]
    if missing:
        raise NicError(f"{attrs.get('source_path')}: {len(missing)} blocks are not written yet")
    earlier = attrs.get("blocks", {})  # blocks kept from an earlier completion (a rerun re-encoded others)
    records = {block_name(blk): {**earlier.get(block_name(blk), {}), **_read_record(group, blk),
                                 "bytes": shard_size(group, blk)} for blk, _ in todo}
    group.attrs.update({"blocks": records, "status": COMPLETE})
    sync(group.store.delete_dir(f"{group['features'].store_path.path}/_blocks"))



def block_name(block: Block) -> str:
    return f"{block.index[0]}.{block.index[1]}"


def check_slide(group: zarr.Group, verify: bool = False) -> list[tuple[Block, str]]:
    """Damaged blocks of a complete slide: shards missing or of another size than written, and
    with ``verify`` any chunk whose checksum fails. Empty when the slide is intact."""
    attrs = group.attrs
    problems = []
    for blk, _ in blocks_with_tissue(group["tissue"][...], attrs["block"], attrs["min_tissue"]):
        recorded = attrs.get("blocks", {}).get(block_name(blk), {}).get("bytes")
        size = shard_size(group, blk)
        if size is None:
            problems.append((blk, "missing"))
        elif recorded is not None and size != recorded:
            problems.append((blk, f"{size} bytes where {recorded} were written"))
        elif verify:
            try:
                group["features"][(slice(None), *blk.slices)]
            except Exception as err:  # noqa: BLE001 - checksum and decode errors come in several types
                problems.append((blk, f"corrupt ({type(err).__name__}: {err})"))
    return problems


SLIDE_ARRAYS = ("features", "tissue", "y", "x")
MEND = "rerun nic compress to make the slide again"


def _damage_text(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return "is not valid JSON (truncated?)"
    if isinstance(err, ValueError) and "checksum" in str(err).lower():
        return "fails its checksum"
    return f"cannot be read ({type(err).__name__}: {err})"


def slide_damage(store, slide_id: str) -> str | None:
    """What is damaged in a slide's own metadata and small arrays, read from its files (never a
    consolidated copy), or None: a ``zarr.json`` that does not parse (the slide's or an array's),
    an array missing from a finished slide, a ``tissue``, ``y`` or ``x`` chunk whose checksum
    fails. Shards are :func:`check_slide`'s. A few small reads: cheap enough for every rerun and
    every ``nic inspect``/``nic train``.

    ``store``: a path or a Zarr store. A group without ``status`` (being made) is not damaged: its
    arrays may not exist yet, and its creation is redone anyway.
    """
    store = str(store) if isinstance(store, (str, os.PathLike)) else store
    try:
        group = open_slide_group(store, slide_id, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except Exception as err:  # noqa: BLE001 - zarr and json raise several types for a damaged file
        return f"its zarr.json {_damage_text(err)}"
    if "status" not in group.attrs:
        return None
    for name in SLIDE_ARRAYS:
        try:
            array = zarr.open_array(store, path=f"{slide_id}/{name}", mode="r", zarr_format=3)
        except FileNotFoundError:
            return f"its {name} array is missing"
        except Exception as err:  # noqa: BLE001
            if isinstance(err, (zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError)):
                return f"its {name} array is missing"
            return f"its {name}/zarr.json {_damage_text(err)}"
        if name != "features":
            try:
                array[...]
            except Exception as err:  # noqa: BLE001 - checksum and decode errors come in several types
                return f"its {name} chunk {_damage_text(err)}"
    return None


def delete_block(group: zarr.Group, block: Block) -> None:
    sync(group.store.delete(_shard_key(group, block)))


def record_failures(root: zarr.Group, failures: dict[str, str], succeeded: list[str]) -> None:
    """Keep the reasons of failed slides in the root attributes; drop those that now succeeded."""
    failed = {k: v for k, v in root.attrs.get("failed", {}).items() if k not in succeeded}
    failed.update(failures)
    root.attrs["failed"] = failed


def record_run(root: zarr.Group, manifest: dict, keep: int = 50) -> None:
    """Append a run manifest (what ran, where, with which settings and versions)."""
    runs = list(root.attrs.get("runs", []))[-(keep - 1):]
    root.attrs["runs"] = [*runs, manifest]


def child_path(root: zarr.Group, name: str) -> str:
    return f"{root.path}/{name}".strip("/")
