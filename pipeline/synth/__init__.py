"""Synthetic H&E-like whole-slide images: the project's test, demo and low-SNR study data.

A slide is a deterministic function of slide coordinates and a seed:

* low-frequency fields (tissue sections, lesion blobs, fat, lymphoid aggregates, stain
  drift, pen marks) live on a coarse grid of one value per ``MASK_DOWNSAMPLE`` x
  ``MASK_DOWNSAMPLE`` level-0 pixels and are interpolated bilinearly per tile;
* high-frequency texture (nuclei, stroma fibres, fat vacuoles) is drawn from integer hashes
  of cell coordinates in slide µm, so it needs no memory, has no tile seams and is the same
  geometry at every pyramid level.

Every pyramid level is therefore rendered independently, tile by tile, and written as a
separate tiled-JPEG IFD with an Aperio-style description (OpenSlide and cuCIM both read it).
No level is ever held in memory. With ``texture="tiles:DIR"`` the tissue is a blended mosaic
of real tiles instead (normal classes as tissue, tumour classes as lesions).

The lesion fraction is defined on the coarse grid: ``lesion_px / tissue_px`` of the masks
returned in :class:`SlideTruth` and written beside each slide as PNGs.

Modules, in data-flow order: ``noise`` (hashes, value noise, cellular noise), ``fields``
(low-frequency content on the mask grid), ``tiles`` (real-tile pools and mosaics), ``stain``
(stain vectors, per-slide jitter), ``render`` (pixels of any region), ``writer`` (the pyramidal
TIFF), ``slide`` (one slide and its truth), ``cohort`` (N slides, masks, labels).
"""

from nic_pipeline.synth.cohort import (
    CohortSpec,
    cohort_assignment,
    read_lesion_mask,
    read_tissue_mask,
    write_cohort,
    write_masks,
)
from nic_pipeline.synth.fields import MASK_DOWNSAMPLE, build_fields, mask_shape
from nic_pipeline.synth.slide import SlideTruth, write_synthetic_slide
from nic_pipeline.synth.writer import level_dimensions, pyramid_downsamples

__all__ = [
    "MASK_DOWNSAMPLE",
    "CohortSpec",
    "SlideTruth",
    "build_fields",
    "cohort_assignment",
    "level_dimensions",
    "mask_shape",
    "pyramid_downsamples",
    "read_lesion_mask",
    "read_tissue_mask",
    "write_cohort",
    "write_masks",
    "write_synthetic_slide",
]
