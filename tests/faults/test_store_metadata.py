"""Store damage that was never repaired (issue 21): a truncated slide `zarr.json`, a truncated
`features/zarr.json` and one bit flipped in the `tissue` chunk. Each is named by `nic inspect`,
refused by `nic train` in one line naming the slide, and made again by a rerun of `nic compress`
(plain for two kinds, `--verify` for the third), ending byte-identical to the clean slide."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.faults.conftest import BLOCK
from tests.faults.helpers import nic, noise, one_error_line

pytestmark = pytest.mark.slow


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {  # slide id: (file damaged, how, what inspect and train say)
    "meta": ("zarr.json", truncate, "its zarr.json is not valid JSON (truncated?)"),
    "feat": ("features/zarr.json", truncate, "its features/zarr.json is not valid JSON (truncated?)"),
    "tissue": ("tissue/c/0/0", flip_a_bit, "its tissue chunk fails its checksum"),
}
PLAIN, VERIFIED = ("meta", "feat"), ("tissue",)


def copies(clean, store, slide_ids) -> None:
    """A finished store holding one copy of the clean slide under each id, as a run leaves it."""
    shutil.copytree(clean, store)
    for slide_id in slide_ids:
        shutil.copytree(store / "good1", store / slide_id)
    shutil.rmtree(store / "good1")


def slide_files(group) -> dict[str, bytes]:
    """Every file of a slide's folder but its own zarr.json (whose source path and mtime name its file)."""
    return {str(p.relative_to(group)): p.read_bytes() for p in sorted(group.rglob("*"))
            if p.is_file() and p.relative_to(group).as_posix() != "zarr.json"}


def attributes(group) -> dict:
    attrs = json.loads((group / "zarr.json").read_text())["attributes"]
    return {k: v for k, v in attrs.items() if k not in ("source_path", "source_mtime_ns")}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, finished_store, good_slides):
    """The damaged store, `nic inspect` on it, a plain rerun and a `--verify` rerun."""
    root = tmp_path_factory.mktemp("metadata")
    store = root / "store.zarr"
    copies(finished_store[0], store, DAMAGE)
    for slide_id, (name, how, _) in DAMAGE.items():
        how(store / slide_id / name)
        shutil.copyfile(good_slides[0], root / f"{slide_id}.tif")
    inspected = nic("inspect", store)
    plain = nic("compress", *(root / f"{s}.tif" for s in PLAIN), "--out", store, "--workers", "2", "--block", BLOCK)
    verified = nic("compress", *(root / f"{s}.tif" for s in VERIFIED), "--out", store, "--workers", "2",
                   "--block", BLOCK, "--verify")
    return dict(store=store, inspected=inspected, plain=plain, verified=verified, after=nic("inspect", "--json", store))


@pytest.mark.parametrize("slide_id", list(DAMAGE))
def test_inspect_names_the_damage(damaged, slide_id):
    inspected = damaged["inspected"]
    assert inspected.returncode == 0 and not noise(inspected), inspected.stderr
    assert f"FAILED {slide_id}: damaged: {DAMAGE[slide_id][2]}; rerun nic compress to make the slide again" \
        in inspected.stdout.splitlines()


@pytest.mark.parametrize("slide_id", list(DAMAGE))
def test_a_rerun_makes_the_slide_again_byte_identical(damaged, finished_store, slide_id):
    clean = finished_store[0] / "good1"
    mended = damaged["store"] / slide_id
    assert slide_files(mended) == slide_files(clean)
    assert attributes(mended) == attributes(clean)
    row = {r["slide_id"]: r for r in json.loads(damaged["after"].stdout)}[slide_id]
    assert row["status"] == "complete" and row["error"] is None


def test_the_reruns_end_cleanly(damaged):
    for run, n in ((damaged["plain"], len(PLAIN)), (damaged["verified"], len(VERIFIED))):
        assert run.returncode == 0, run.stderr
        assert f"{n}/{n} slides complete" in run.stdout
        assert not noise(run), noise(run)


SIX = "slide_id,label\n" + "".join(f"s{i},{'tumor' if i < 4 else 'normal'}\n" for i in range(1, 7))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_train_refuses_the_damaged_slide_in_one_line(tmp_path, finished_store, kind):
    store = tmp_path / "cohort.zarr"
    copies(finished_store[0], store, [f"s{i}" for i in range(1, 7)])
    name, how, what = DAMAGE[kind]
    how(store / "s4" / name)
    (tmp_path / "labels.csv").write_text(SIX)
    done = nic("train", store, "--labels", tmp_path / "labels.csv", "--out", tmp_path / "run", "--model", "mean",
               "--folds", "2", "--workers", "1")
    assert done.returncode == 2, done.stdout
    assert one_error_line(done) == (f"error: {store}: slide 's4' is damaged ({what}); "
                                    "rerun nic compress on it to mend it")
