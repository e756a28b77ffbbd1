"""Damage to a finished store (issue 13): lost, truncated and bit-flipped shards, a lost slide
`zarr.json`, a half-created slide group and a changed source file, all in one store and mended
by ONE plain rerun, then ONE `--verify` rerun. Encoding is deterministic, so a mended shard is
byte-identical to the clean one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.faults.conftest import BLOCK, features
from tests.faults.helpers import nic, noise

pytestmark = pytest.mark.slow

SHARDS = ("c/0/0/0", "c/0/0/1", "c/0/1/0")  # deleted, truncated, one bit flipped
SLIDES = ("shards", "lost", "half", "changed", "intact")


def shard(store, slide_id: str, key: str):
    return store / slide_id / "features" / key


def damage(store, clean) -> None:
    """Every slide of ``store`` is a copy of the clean slide; damage each as its name says."""
    shard(store, "shards", SHARDS[0]).unlink()
    truncated = shard(store, "shards", SHARDS[1])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    flipped = shard(store, "shards", SHARDS[2])
    data = bytearray(flipped.read_bytes())
    data[20] ^= 0x40
    flipped.write_bytes(bytes(data))
    (store / "lost" / "zarr.json").unlink()
    half_made(store / "half")


def half_made(group) -> None:
    """A slide group as a kill during its creation leaves it: the group and its features array
    made, its tissue, coordinates and attributes (status last) not yet."""
    meta = json.loads((group / "zarr.json").read_text())
    for path in group.iterdir():
        if path.name not in ("zarr.json", "features"):
            shutil.rmtree(path)
    shutil.rmtree(group / "features" / "c")
    (group / "zarr.json").write_text(json.dumps({**meta, "attributes": {}}))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, finished_store, good_slides):
    """The finished store with one copy of its slide per damage, the matching slide files, and
    the outputs of inspect (before), a plain rerun, inspect (after) and a --verify rerun."""
    clean, _ = finished_store
    root = tmp_path_factory.mktemp("damaged")
    store = root / "store.zarr"
    shutil.copytree(clean, store)
    for slide_id in SLIDES:
        shutil.copytree(store / "good1", store / slide_id)
        shutil.copyfile(good_slides[1] if slide_id == "changed" else good_slides[0], root / f"{slide_id}.tif")
    shutil.rmtree(store / "good1")
    damage(store, clean)
    slides = [root / f"{slide_id}.tif" for slide_id in SLIDES]
    before = nic("inspect", store)
    rerun = nic("compress", *slides, "--out", store, "--workers", "2", "--block", BLOCK)
    after = nic("inspect", "--json", store)
    mended = {key: shard(store, "shards", key).read_bytes() for key in SHARDS}
    verified = nic("compress", root / "shards.tif", "--out", store, "--workers", "2", "--block", BLOCK, "--verify")
    return dict(store=store, root=root, before=before, rerun=rerun, after=after, mended=mended, verified=verified)


def failed_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("FAILED ")]


def test_inspect_on_the_damaged_store_does_not_crash(damaged):
    before = damaged["before"]
    assert before.returncode == 0, before.stderr
    assert not noise(before), before.stderr


def test_a_plain_rerun_reencodes_the_lost_and_truncated_shards(damaged, finished_store):
    clean = finished_store[0]
    for key in SHARDS[:2]:
        assert damaged["mended"][key] == shard(clean, "good1", key).read_bytes()
    assert damaged["mended"][SHARDS[2]] != shard(clean, "good1", SHARDS[2]).read_bytes()  # only --verify reads it


def test_verify_reencodes_the_flipped_shard_and_the_codes_equal_the_clean_ones(damaged, finished_store):
    verified = damaged["verified"]
    assert verified.returncode == 0, verified.stderr
    assert "1 blocks this run" in verified.stdout
    assert np.array_equal(features(damaged["store"], "shards"), finished_store[1])


def test_a_half_created_slide_group_is_made_again(damaged, finished_store):
    rows = {r["slide_id"]: r for r in json.loads(damaged["after"].stdout)}
    assert rows["half"]["status"] == "complete"
    assert np.array_equal(features(damaged["store"], "half"), finished_store[1])


def test_a_lost_slide_zarr_json_is_made_again(damaged, finished_store):
    assert not [line for line in failed_lines(damaged["rerun"]) if "lost.tif" in line]
    assert np.array_equal(features(damaged["store"], "lost"), finished_store[1])


def test_a_changed_source_fails_naming_redo_changed(damaged):
    lines = [line for line in failed_lines(damaged["rerun"]) if "changed.tif" in line]
    assert lines == [f"FAILED {damaged['root'] / 'changed.tif'}: the slide file changed since it was compressed; "
                     "pass --redo-changed to compress it again"]
    assert damaged["rerun"].returncode == 1


def test_an_intact_slide_is_skipped(damaged):
    rows = {r["slide_id"]: r for r in json.loads(damaged["after"].stdout)}
    assert rows["intact"]["status"] == "complete" and rows["intact"]["error"] is None
    assert not [line for line in failed_lines(damaged["rerun"]) if "intact.tif" in line]


def test_the_rerun_prints_no_traceback(damaged):
    assert not noise(damaged["rerun"]), noise(damaged["rerun"])


@pytest.fixture(scope="module")
def killed_listing(damaged, tmp_path_factory):
    """`nic inspect` on a store whose first run was killed (no consolidated metadata), holding a
    half-made slide group and a slide folder without its zarr.json."""
    store = tmp_path_factory.mktemp("killed") / "killed.zarr"
    shutil.copytree(damaged["store"], store)
    meta = json.loads((store / "zarr.json").read_text())
    meta.pop("consolidated_metadata", None)
    (store / "zarr.json").write_text(json.dumps(meta))
    half_made(store / "half")
    (store / "lost" / "zarr.json").unlink(missing_ok=True)
    return nic("inspect", store)


def test_inspect_lists_a_half_made_slide_as_in_progress(killed_listing):
    assert killed_listing.returncode == 0, killed_listing.stderr
    assert any(line.split()[:2] == ["half", "in-progress"] for line in killed_listing.stdout.splitlines())


def test_inspect_lists_a_slide_folder_without_zarr_json_quietly(killed_listing):
    assert any(line.split()[:1] == ["lost"] for line in killed_listing.stdout.splitlines()), killed_listing.stdout
    assert not noise(killed_listing), killed_listing.stderr
