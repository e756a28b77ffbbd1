"""Synthetic slides and cohorts with known lesions, for tests, demos and stress tests."""

from pipeline.synth.core import (
    MASK_DOWNSAMPLE,
    CohortSpec,
    SlideTruth,
    build_fields,
    cohort_assignment,
    level_dimensions,
    mask_shape,
    pyramid_downsamples,
    read_lesion_mask,
    read_tissue_mask,
    write_cohort,
    write_masks,
    write_synthetic_slide,
)
