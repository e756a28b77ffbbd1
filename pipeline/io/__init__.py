"""Slides in: one reader per backend behind one :class:`Slide` interface, µm/px rules, file checks."""

from pipeline.io.slides import (
    SUFFIXES,
    Slide,
    find_slides,
    has_gpu,
    open_slide,
    read_mpp_csv,
    resample,
    slide_id_of,
)

__all__ = ["SUFFIXES", "Slide", "find_slides", "has_gpu", "open_slide", "read_mpp_csv", "resample", "slide_id_of"]
