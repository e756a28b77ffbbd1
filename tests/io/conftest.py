"""Fixtures for the io tests."""

from __future__ import annotations

import pytest

from tests.io.helpers import smooth_image, write_aperio_tiff


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """(path, image) of a 1024x1024 three-level Aperio-style JPEG TIFF at 0.5 µm/px."""
    image = smooth_image(1024)
    path = write_aperio_tiff(tmp_path_factory.mktemp("synthetic") / "synthetic-slide.svs", image)
    return path, image
