"""Linear-probe comparison of patch encoders on held-out real data (the table in docs/encoders.md).

    nice python benchmarks/encoder_probe.py --threads 1 \
        --encoder nic-mtl-v1=models/weights/nic-mtl-v1.json \
        --encoder loto-no-lc25000=/tmp/nic_runs/loto-lc/nic-mtl-v1-no-lc25000.json ... \
        --out-json docs/encoder_probe.json --out-md docs/encoder_probe.md

Probe sets (all at 0.5 µm/px; patches cut at each encoder's own patch size):

* ``lc25000_heldout``: every tile of the LC25000 groups that nic-mtl-v1 held out for validation
  (the same seeded group split as training: ``group_split(groups, labels, 0.2, seed=0)``),
  3 classes, 2x2 crops averaged per tile, tiles at the assumed 1.7 µm/px, 5-fold
  StratifiedGroupKFold by group.
* ``lc25000_all``: one tile per LC25000 group, all groups (for the leave-one-task-out encoder,
  which never saw LC25000; encoders trained on LC25000 have seen most of these groups).
* ``monuseg_split``: nucleus fraction of the central 64 µm of a 4x4 grid of patches per MoNuSeg
  image; ridge probe fitted on the 21 training images of nic-mtl-v1's split, Spearman on the 6
  held-out images (96 patches). ``monuseg_heldout`` / ``monuseg_all``: the same patches,
  GroupKFold by image within the held-out images / over all 27 images.
* ``kather2016``: the 24 Kather 2016 tiles, 8 classes, 3-fold (seen in training by nic-mtl-v1).
* ``pcam``: PatchCamelyon metastasis vs normal; logistic probe fitted on the PCam *train* patches
  (all 11,990, or a fixed class-balanced subset with ``--pcam-train``), AUC on the 3,000 *valid*
  patches (never trained on by any encoder here). One centre patch per 96 px tile at ~0.97 µm/px
  (64 µm of the 93 µm tile, always containing the central 32 px that define the label).

Encoders are ``LABEL=SPEC``; SPEC is a registry name, a card path, or ``NAME@random`` (seeded
random weights, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nic_models.registry import create_encoder  # noqa: E402
from nic_pipeline.encoder import tiles as T  # noqa: E402
from nic_pipeline.encoder.probe import format_table, holdout_probe, probe  # noqa: E402
from nic_pipeline.io.masks import read_mask  # noqa: E402

DEFAULT_ENCODERS = [
    "nic-mtl4-tellez2020=nic-mtl4-tellez2020",
    "nic-bigan-tellez2019=nic-bigan-tellez2019",
    "nic-cnn-random=nic-mtl4-tellez2020@random",
    "resnet50-trunc-random=resnet50-trunc@random",
]
LC_MPP = 1.7
MONUSEG_MPP = 0.25
PCAM_MPP = 0.97


def load_encoder(spec: str):
    name, _, mode = spec.partition("@")
    return create_encoder(name, random_init=(mode == "random"), seed=0)


def lc25000_sets(data: Path):
    table = pd.read_csv(data / "lc25000_lung" / "labels.csv")
    _, val = T.group_split(table["group"], table["label"], 0.2, seed=0)
    heldout = table.iloc[val]
    one_per_group = table.groupby("group", sort=True).head(1)
    return {"lc25000_heldout": heldout, "lc25000_all": one_per_group}


def monuseg_heldout_images(data: Path) -> set[str]:
    """The MoNuSeg images nic-mtl-v1 held out (same seeded split as training)."""
    rels = T.list_images(data / "monuseg2018" / "images")
    groups = np.asarray([r.stem for r in rels])
    _, val = T.group_split(groups, None, 0.2, seed=0)
    return set(groups[val])


def monuseg_patches(data: Path, which: str, size_for: int):
    """Patches of ``size_for`` px centred on a 4x4 grid of each image at 0.5 µm/px, and targets."""
    root = data / "monuseg2018"
    rels = T.list_images(root / "images")
    if which == "heldout":
        held = monuseg_heldout_images(data)
        rels = [r for r in rels if r.stem in held]
    xs, ys, gs = [], [], []
    for rel in rels:
        image = T.read_rgb(root / "images" / rel)
        mask = read_mask(root / "masks" / (rel.stem + ".png")).astype(np.float32)
        image, _, mask = T.prepare_image(image, MONUSEG_MPP, 0.5, mask)
        h, w = mask.shape
        for cy in np.linspace(112, h - 112, 4):
            for cx in np.linspace(112, w - 112, 4):
                xs.append(T.crop_resample(image, (cx - size_for / 2, cy - size_for / 2, size_for), size_for))
                ys.append(T.box_mean(mask, (cx - 64, cy - 64, 128)))
                gs.append(rel.stem)
    return np.stack(xs), np.asarray(ys), np.asarray(gs)


def encode_patches(encoder, patches: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            out.append(encoder(torch.from_numpy(patches[i:i + batch])).float().numpy())
    return np.concatenate(out)


def split_probe(X, y, groups, test_groups: set[str]) -> dict:
    """Ridge probe fitted on the training groups and scored on the held-out ones."""
    test = np.isin(groups, sorted(test_groups))
    res = holdout_probe(X, y, test, kind="regression")
    res["n_groups"] = int(len(np.unique(groups[test])))
    return res


def pcam_table(data: Path, n_train: int | None, seed: int = 0) -> pd.DataFrame:
    """PCam rows to probe: every valid patch and all train patches (or a fixed balanced subset)."""
    table = pd.read_csv(data / "pcam" / "labels.csv")
    train = table[table["split"] == "train"]
    if n_train and n_train < len(train):
        train = train.groupby("label", group_keys=False).apply(
            lambda g: g.sample(n=n_train // 2, random_state=seed))
    return pd.concat([train, table[table["split"] == "valid"]], ignore_index=True)


def run(encoders: list[str], data: Path, sets: list[str], crops: int = 2, pcam_train: int | None = None) -> dict:
    results: dict[str, dict] = {}
    lc = lc25000_sets(data)
    kather_root = data / "tiles" / "kather2016_samples"
    kather_paths = [p.as_posix() for p in T.list_images(kather_root)]
    kather_labels = np.asarray([p.split("/")[0] for p in kather_paths])
    pcam = pcam_table(data, pcam_train) if "pcam" in sets else None
    for item in encoders:
        label, _, spec = item.partition("=")
        encoder = load_encoder(spec or label)
        size = encoder.spec.patch_size
        results[label] = {"encoder": spec or label, "weights_sha256": encoder.weights_sha256}
        t0 = time.time()
        for name in sets:
            if name.startswith("lc25000"):
                table = lc[name]
                feats = T.embed_tiles(data / "lc25000_lung", list(table["path"]), encoder, mpp=LC_MPP,
                                      crops=crops, progress=False)
                res = probe(feats, table["label"].to_numpy(), table["group"].to_numpy(), n_splits=5)
            elif name == "monuseg_split":  # fit on the training images, score on the held-out ones
                x, y, g = monuseg_patches(data, "all", size)
                res = split_probe(encode_patches(encoder, x), y, g, monuseg_heldout_images(data))
            elif name.startswith("monuseg"):
                x, y, g = monuseg_patches(data, name.split("_")[1], size)
                res = probe(encode_patches(encoder, x), y, g, kind="regression", n_splits=5)
            elif name == "pcam":
                feats = T.embed_tiles(data / "pcam", list(pcam["path"]), encoder, mpp=PCAM_MPP, crops=1,
                                      progress=False)
                res = holdout_probe(feats, pcam["label"].to_numpy(), (pcam["split"] == "valid").to_numpy(),
                                    kind="classification")
            elif name == "kather2016":
                feats = T.embed_tiles(kather_root, kather_paths, encoder, mpp=0.495, crops=crops, progress=False)
                res = probe(feats, kather_labels, np.asarray(kather_paths), n_splits=3)
            else:
                raise SystemExit(f"unknown probe set {name}")
            results[label][name] = res
            print(f"{label:<28} {name:<16} " + "  ".join(f"{k}={res[k]:.3f}" for k in
                  ("balanced_accuracy", "auc", "spearman") if k in res), flush=True)
        results[label]["seconds"] = round(time.time() - t0, 1)
    return results


def markdown(results: dict, sets: list[str]) -> str:
    cols = []
    for name in sets:
        if name.startswith("monuseg"):
            cols.append((name, "spearman", f"{name} Spearman"))
        else:
            cols += [(name, "balanced_accuracy", f"{name} bal. acc."), (name, "auc", f"{name} AUC")]
    lines = ["| encoder | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in results.items():
        cells = [f"{r[s][m]:.3f}" if s in r and m in r[s] else "–" for s, m, _ in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", action="append", default=[], help="LABEL=SPEC (repeatable)")
    parser.add_argument("--no-defaults", action="store_true", help="Only the --encoder ones.")
    parser.add_argument("--sets", default="lc25000_heldout,monuseg_split,pcam,kather2016,lc25000_all,monuseg_all")
    parser.add_argument("--pcam-train", type=int, default=None,
                        help="Fit the PCam probe on a fixed class-balanced subset of this many train patches.")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--crops", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="Earlier --out-json results to include in the table (cells recomputed here win).")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoders = args.encoder + ([] if args.no_defaults else DEFAULT_ENCODERS)
    sets = args.sets.split(",")
    results = run(encoders, args.data_root, sets, crops=args.crops, pcam_train=args.pcam_train)
    merged: dict[str, dict] = {}
    for earlier in args.merge:
        for label, cells in json.loads(earlier.read_text())["results"].items():
            merged.setdefault(label, {}).update(cells)
    for label, cells in results.items():
        merged.setdefault(label, {}).update(cells)
    results = merged
    sets = list(dict.fromkeys(sets + [k for r in results.values() for k in r if isinstance(r[k], dict)]))
    for name in sets:
        print(f"\n{name}\n" + format_table({k: v[name] for k, v in results.items() if name in v}))
    table = markdown(results, sets)
    print("\n" + table)
    meta = {"command": "python " + " ".join(sys.argv), "sets": sets, "crops": args.crops,
            "torch": torch.__version__, "results": results}
    if args.out_json:
        args.out_json.write_text(json.dumps(meta, indent=2) + "\n")
    if args.out_md:
        args.out_md.write_text(table)


if __name__ == "__main__":
    main()
