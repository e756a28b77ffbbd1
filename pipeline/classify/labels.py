"""Labels, targets and cross-validation folds: the labels CSV in, model targets and a fold per
slide out; fixed train/val/test splits in CLAM's ``splits_K.csv`` format, read and written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from nic_models.slide_models import TASKS
from nic_pipeline.errors import NicError


def load_labels(path, task: str) -> pd.DataFrame:
    """Read a labels CSV (slide_id,label[,group] or slide_id,time,event[,group]) or check a
    DataFrame of the same columns; NicError if malformed.

    Column names and text values are stripped of spaces (``tumor `` is ``tumor``). Rows without a
    label (empty or NaN) are left out with a warning naming them; their slide ids are in
    ``frame.attrs["without_label"]``.
    """
    if task not in TASKS:
        raise NicError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if isinstance(path, pd.DataFrame):
        frame, path = path.copy(), "labels"
    else:
        frame = _read_csv(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    needed = ["slide_id"] + (["time", "event"] if task == "survival" else ["label"])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise NicError(f"{path}: labels CSV lacks column(s) {', '.join(missing)} needed for task {task} "
                       f"(it has {', '.join(map(str, frame.columns)) or 'none'})")
    frame = _strip_values(frame)
    unlabelled = frame[needed[1:]].isna().any(axis=1)
    without = frame.loc[unlabelled, "slide_id"].astype(str).tolist()
    if without:
        warnings.warn(f"{path}: {len(without)} slide(s) without a label left out: {_some(without)}", stacklevel=2)
    frame = frame[~unlabelled].reset_index(drop=True)
    dupes = frame["slide_id"][frame["slide_id"].duplicated()].tolist()
    if dupes:
        raise NicError(f"{path}: slide_id listed more than once: {', '.join(dupes[:5])}")
    if len(frame) == 0:
        raise NicError(f"{path}: no labelled slides")
    frame.attrs["without_label"] = without
    return frame


def _read_csv(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"slide_id": str, "group": str}, skipinitialspace=True)
    except pd.errors.EmptyDataError as err:
        raise NicError(f"{path}: the labels CSV is empty; expected a header slide_id,label") from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise NicError(f"{path}: cannot read labels CSV ({err})") from err


def _strip_values(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells stripped of surrounding spaces; cells left empty become NaN."""
    frame = frame.copy()
    frame["slide_id"] = frame["slide_id"].astype(str)
    for column in frame.columns:
        if frame[column].dtype == object:
            stripped = frame[column].map(lambda v: v.strip() if isinstance(v, str) else v)
            frame[column] = stripped.replace("", np.nan)
    return frame


def _some(names, k: int = 5) -> str:
    return ", ".join(map(str, names[:k])) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def target_spec(labels: pd.DataFrame, task: str) -> dict:
    """How labels map to model targets: class names (sorted; for binary the second is positive),
    or the mean/std used to standardise regression targets."""
    spec: dict = {"task": task}
    if task in ("binary", "multiclass"):
        classes = sorted(labels["label"].astype(str).unique(), key=_natural_key)
        _refuse_case_variants(classes)
        if task == "binary" and len(classes) != 2:
            raise NicError(f"task binary needs exactly 2 label values, found {len(classes)}: {classes[:10]}")
        if task == "multiclass" and len(classes) < 2:
            raise NicError("task multiclass needs at least 2 label values")
        spec["classes"] = classes
    elif task == "regression":
        values = _finite(labels, "label", "task regression needs finite numeric labels")
        spec["mean"], spec["std"] = float(values.mean()), float(values.std(ddof=0) or 1.0)
    else:
        _finite(labels, "time", "task survival needs finite numeric times")
        _finite(labels, "event", "task survival needs events of 0 or 1")
    return spec


def _refuse_case_variants(classes: list[str]) -> None:
    """Class names that differ only in case (``tumor``, ``Tumor``) are one class written two ways:
    refuse, naming them, rather than train them as separate classes."""
    spellings: dict[str, list[str]] = {}
    for name in classes:
        spellings.setdefault(name.casefold(), []).append(name)
    clashes = [names for names in spellings.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(", ".join(names) for names in clashes[:5])
        raise NicError(f"label values that differ only in case: {shown} (write each class one way)")


def _finite(labels: pd.DataFrame, column: str, need: str) -> pd.Series:
    """The column as floats; NicError naming the slides whose value is not a finite number."""
    values = pd.to_numeric(labels[column], errors="coerce").astype(float)
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        shown = [f"{sid}={value!r}" for sid, value in zip(labels.loc[bad, "slide_id"], labels.loc[bad, column])]
        raise NicError(f"{need}: {_some(shown)}")
    return values


def _natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def encode_targets(labels: pd.DataFrame, spec: dict) -> dict[str, np.ndarray]:
    """Arrays target/time/event aligned with the rows of ``labels``."""
    task, n = spec["task"], len(labels)
    out = {"time": np.zeros(n, np.float32), "event": np.zeros(n, np.float32)}
    if task in ("binary", "multiclass"):
        index = {c: i for i, c in enumerate(spec["classes"])}
        out["target"] = labels["label"].astype(str).map(index).to_numpy(np.int64)
    elif task == "regression":
        out["target"] = ((labels["label"].astype(float) - spec["mean"]) / spec["std"]).to_numpy(np.float32)
    else:
        out["time"] = labels["time"].to_numpy(np.float32)
        out["event"] = labels["event"].astype(float).to_numpy(np.float32)
        out["target"] = out["event"].copy()
    return out


def assign_folds(labels: pd.DataFrame, task: str, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per row: stratified for classification (by event for survival), grouped by
    patient when a ``group`` column exists (StratifiedGroupKFold / GroupKFold / KFold)."""
    n = len(labels)
    groups = labels["group"].astype(str).to_numpy() if "group" in labels.columns else None
    if task in ("binary", "multiclass"):
        strata = labels["label"].astype(str).to_numpy()
    elif task == "survival":
        strata = labels["event"].astype(int).astype(str).to_numpy()
    else:
        strata = None
    if strata is not None and groups is not None:
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    elif strata is not None:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    elif groups is not None:
        splitter = GroupKFold(k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(k, shuffle=True, random_state=seed)
    folds = np.full(n, -1, dtype=int)
    try:
        for fold, (_, test) in enumerate(splitter.split(np.zeros(n), strata, groups)):
            folds[test] = fold
    except ValueError as err:
        most = _most_folds(strata, groups, n)
        hint = f"use fewer --folds: at most {most}" if most >= 2 else "use fewer --folds (below 2: final model only)"
        raise NicError(f"cannot make {k} folds from {n} slides ({err}); {hint}") from err
    return folds


def _most_folds(strata, groups, n: int) -> int:
    """The most folds the split can make: every fold needs a patient (group) of every class."""
    units = pd.Series(groups if groups is not None else np.arange(n))
    if strata is None:
        return int(units.nunique())
    return int(units.groupby(pd.Series(strata)).nunique().min())


SPLIT_COLUMNS = ("train", "val", "test")


def read_splits(path) -> list[dict[str, list[str]]]:
    """Fixed splits in CLAM's format: a ``splits_K.csv`` file (one split) or a folder of them (one
    split per K, in order of K). Each file has an index column and the columns train, val, test,
    each listing slide ids (shorter columns padded with empty cells), as CLAM's
    ``create_splits_seq.py`` writes them. Returns ``[{"train": [...], "val": [...], "test": [...]}]``;
    NicError naming the file when one is malformed or lists a slide twice."""
    path = Path(path)
    if path.is_dir():
        numbered = {}
        for file in path.glob("splits_*.csv"):
            match = re.fullmatch(r"splits_(\d+)\.csv", file.name)  # not CLAM's _bool / _descriptor files
            if match:
                numbered[int(match.group(1))] = file
        if not numbered:
            raise NicError(f"{path}: no splits_K.csv files (CLAM's format: columns train,val,test of slide ids)")
        files = [numbered[k] for k in sorted(numbered)]
    else:
        files = [path]
    return [_read_split(file) for file in files]


def _read_split(file: Path) -> dict[str, list[str]]:
    try:
        frame = pd.read_csv(file, dtype=str, index_col=0)  # ids stay text: zero-padding survives
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise NicError(f"{file}: cannot read splits CSV ({err})") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("train", "test") if c not in frame.columns]
    if missing:
        raise NicError(f"{file}: splits CSV lacks column(s) {', '.join(missing)} (CLAM's format: an index column, "
                       f"then train,val,test of slide ids; it has {', '.join(frame.columns) or 'none'})")
    split = {c: [s.strip() for s in frame[c].dropna() if s.strip()] if c in frame.columns else []
             for c in SPLIT_COLUMNS}
    seen: dict[str, str] = {}
    for column, ids in split.items():
        for sid in ids:
            if sid in seen:
                raise NicError(f"{file}: slide {sid} is listed in {seen[sid]} and {column}" if seen[sid] != column
                               else f"{file}: slide {sid} is listed twice in {column}")
            seen[sid] = column
    if not split["train"]:
        raise NicError(f"{file}: no slides to train on (column train is empty)")
    return split


def write_splits(directory, splits: list[dict[str, list[str]]]) -> list[Path]:
    """Write ``directory/splits_K.csv`` per split in CLAM's format (an unnamed index column, then
    train, val, test, the shorter columns padded with empty cells): CLAM's ``main.py --split_dir``
    and ``nic train --splits`` both read them back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for k, split in enumerate(splits):
        frame = pd.concat([pd.Series(list(split.get(c, [])), dtype=object, name=c) for c in SPLIT_COLUMNS], axis=1)
        file = directory / f"splits_{k}.csv"
        frame.to_csv(file)
        written.append(file)
    return written
