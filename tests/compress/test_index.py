"""The store's slide index (issue 24): lines appended as slides finish, used only while the
slide's files are unchanged, merged when they pile up, never the truth about a slide."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from nic_pipeline.classify.source import SlideSource
from nic_pipeline.compress.catalog import describe_store, index_entry, list_slides
from nic_pipeline.compress.grid import Grid, iter_blocks
from nic_pipeline.compress.index import INDEX_DIR, IndexWriter, is_current, merge_parts, read_index
from nic_pipeline.compress.store import CompressionConfig, create_slide, mark_complete, open_store, write_block

CONFIG = CompressionConfig(encoder="nic-test", encoder_sha256="abc", code_dim=8, mpp=0.5, patch_size=128,
                           stride=128, block=4, min_tissue=0.1, mask_mpp=8.0, precision="fp32")
GRID = Grid(width=128 * 10, height=128 * 6, slide_mpp=0.5, mpp=0.5, patch_size=128, stride=128)


def finished_slide(store, slide_id: str, seed: int) -> None:
    """A complete slide written through the store's own functions."""
    rng = np.random.default_rng(seed)
    tissue = (rng.random(GRID.shape) > 0.3).astype(np.float32)
    group = create_slide(open_store(store, CONFIG), slide_id, GRID, CONFIG, tissue,
                         {"source_path": f"/data/{slide_id}.svs", "source_size": 1, "source_mtime_ns": 1,
                          "source_fingerprint": slide_id})
    codes = rng.normal(size=(8, *GRID.shape)).astype(np.float16) * (tissue >= CONFIG.min_tissue)
    for block in iter_blocks(GRID.shape, CONFIG.block):
        if (tissue[block.slices] >= CONFIG.min_tissue).any():
            write_block(group, block, codes[(slice(None), *block.slices)])
    mark_complete(group)


@pytest.fixture()
def indexed(tmp_path):
    """A store of three complete slides, each with its index line, as a run leaves it."""
    store = tmp_path / "s.zarr"
    writer = IndexWriter(store, "run1")
    for i, slide_id in enumerate(("a", "b", "c")):
        finished_slide(store, slide_id, i)
        writer.add(index_entry(str(store), slide_id))
    writer.close()
    return store


def test_the_index_describes_the_store_as_its_own_metadata_does(indexed):
    from_index = describe_store(indexed)
    shutil.rmtree(indexed / INDEX_DIR)
    from_metadata = describe_store(indexed)
    assert from_index == from_metadata
    assert [r["slide_id"] for r in from_index] == ["a", "b", "c"]
    assert all(r["status"] == "complete" and r["tissue_cells"] > 0 for r in from_index)


def test_a_line_is_used_only_while_every_file_of_its_slide_is_unchanged(indexed):
    entries = read_index(indexed)
    assert all(is_current(indexed, entry) for entry in entries.values())
    shard = next(p for p in sorted((indexed / "b" / "features").rglob("*")) if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated after the run
    assert not is_current(indexed, entries["b"]) and is_current(indexed, entries["a"])
    os.utime(indexed / "c" / "zarr.json", ns=(1, 1))  # same size, another time: rewritten
    assert not is_current(indexed, entries["c"])
    with pytest.raises(Exception, match="damaged"):  # read from its own files, the damage shows
        SlideSource(indexed).meta("b")
    assert SlideSource(indexed).shape("a") == (8, *GRID.shape)


def test_a_removed_slide_leaves_the_listing_and_an_unindexed_one_joins_it(indexed, tmp_path):
    shutil.rmtree(indexed / "a")
    finished_slide(indexed, "d", 3)  # finished by a run killed before it wrote d's line
    assert "d" not in read_index(indexed)
    assert list_slides(indexed) == ["b", "c", "d"]
    assert [r["slide_id"] for r in describe_store(indexed)] == ["b", "c", "d"]


def test_a_killed_runs_partial_line_is_skipped_and_later_lines_win(indexed):
    part = next((indexed / INDEX_DIR).glob("*.jsonl"))
    later = json.loads(part.read_text().splitlines()[0])
    later["attrs"]["note"] = "later"
    (indexed / INDEX_DIR / "99991231T000000-run2.jsonl").write_text(json.dumps(later) + "\n" + '{"slide_id": "b", "sh')
    entries = read_index(indexed)
    assert entries["a"]["attrs"]["note"] == "later" and "note" not in entries["b"]["attrs"]


def test_runs_add_one_file_each_and_merging_keeps_every_latest_line(indexed):
    before = read_index(indexed)
    for run in range(20):
        writer = IndexWriter(indexed, f"r{run:02d}")
        writer.path = writer.path.with_name(f"9{run:014d}-r.jsonl")  # distinct, ordered names
        writer.add({**before["a"], "attrs": {**before["a"]["attrs"], "run": run}})
        writer.close()
    parts = sorted((indexed / INDEX_DIR).glob("*.jsonl"))
    assert len(parts) <= 16
    merge_parts(indexed, keep=1)
    assert len(list((indexed / INDEX_DIR).glob("*"))) == 1
    after = read_index(indexed)
    assert after["a"]["attrs"]["run"] == 19 and after["b"] == before["b"] and after["c"] == before["c"]
