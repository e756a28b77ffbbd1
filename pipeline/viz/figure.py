"""One figure for every picture of a slide: the same size, millimetre axes and wording.

`nic view` (thumbnail | PCA-RGB), `nic heatmap` (relevance over the thumbnail | PCA-RGB) and
`nic preview` (tissue mask | patch grid) all draw two panels of one slide side by side through
:func:`slide_figure`: 2400 x 1200 px, both axes in mm from the slide's top-left corner, so a
region has the same coordinates in every picture of it. Slide files are found in one way
(:func:`slide_file`): the ``--slides`` folders when given, else the source path the store recorded.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

from nic_pipeline.errors import NicError  # noqa: E402
from nic_pipeline.io import find_slides, open_slide  # noqa: E402
from nic_pipeline.io.files import slide_id_of  # noqa: E402

FIGSIZE, DPI = (16, 8), 150  # 2400 x 1200 px
THUMBNAIL_PX = 2048  # longer side of a slide thumbnail, about one screen pixel per figure pixel
PCA_TITLE = "compressed codes, PCA to RGB (one PCA for the cohort)"
UNIT = "mm"


def slide_figure(title: str = ""):
    """(figure, (left axes, right axes)): two panels of one slide, mm axes, the title on top."""
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI, layout="constrained")
    for ax in axes:
        ax.set_xlabel(UNIT)
        ax.set_ylabel(UNIT)
    if title:
        fig.suptitle(title, fontsize=13)
    return fig, tuple(axes)


def mm(extent_um) -> tuple[float, ...]:
    """An imshow extent (left, right, bottom, top) from µm to mm."""
    return tuple(v / 1000 for v in extent_um)


def show_thumbnail(ax, thumbnail, size_um) -> None:
    """Draw a slide thumbnail over the slide's whole extent ``size_um`` (height, width) µm."""
    ax.imshow(thumbnail, extent=(0, size_um[1] / 1000, size_um[0] / 1000, 0))


def save(fig, path) -> Path:
    """Write the figure as a PNG (folders made) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def slide_thumbnail(path, slide_mpp: float | None = None, max_size: int = THUMBNAIL_PX):
    """(thumbnail (h, w, 3) uint8, (height_um, width_um)) of a slide file; the size is None when
    neither the file nor ``slide_mpp`` gives a µm/px. ``slide_mpp`` (the store's) comes first:
    it is what the slide was compressed at."""
    with open_slide(path, mpp=slide_mpp) as slide:
        mpp = slide_mpp or slide.mpp
        width, height = slide.dimensions
        thumbnail = slide.thumbnail(max_size)
    return thumbnail, ((height * mpp, width * mpp) if mpp else None)


def slide_size_um(path, slide_mpp: float | None = None) -> tuple[float, float] | None:
    """(height_um, width_um) of a slide file (``slide_mpp`` first, else its own), or None."""
    with open_slide(path, mpp=slide_mpp) as slide:
        mpp = slide_mpp or slide.mpp
        width, height = slide.dimensions
    return (height * mpp, width * mpp) if mpp else None


def slide_files_by_id(folders) -> dict[str, Path]:
    """Slide files under ``folders`` (folders or files) by slide id, as `nic compress` names them."""
    if not folders:
        return {}
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    return {slide_id_of(path): path for path in find_slides(folders)}


def check_folders_hold_slides(files: dict, slide_ids, folders) -> None:
    """NicError when ``--slides`` folders were given but hold none of the slides asked for."""
    if folders and not set(files) & set(slide_ids):
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        raise NicError(f"none of the store's slides is under {', '.join(map(str, folders))} (--slides); "
                       "leave it out to use the paths the store recorded")


def slide_file(slide_id: str, attrs: dict, files: dict[str, Path]) -> Path | None:
    """The slide's file: from ``files`` (``--slides``), else the source path the store recorded in
    the slide's ``attrs`` when it still exists; None (no thumbnail) otherwise."""
    if slide_id in files:
        return Path(files[slide_id])
    recorded = attrs.get("source_path")
    return Path(recorded) if recorded and Path(recorded).is_file() else None
