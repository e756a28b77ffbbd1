"""Synthetic slides and cohorts with known lesions, for tests, demos and stress tests."""

from pipeline.synth.core import (
    MASK_DOWNSAMPLE,
    CohortSpec,
    SlideTruth,
    read_lesion_mask,
    read_tissue_mask,
    write_cohort,
    write_synthetic_slide,
)
