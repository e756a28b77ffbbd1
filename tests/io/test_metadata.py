"""pipeline/io/metadata.py: µm/px from each vendor's metadata, overrides, the mpp CSV, `nic info`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nic_pipeline.cli import main
from nic_pipeline.errors import NicError, SlideError
from nic_pipeline.io import open_slide, read_mpp_csv
from tests.conftest import shared_path
from tests.io.helpers import CMU, READERS, TCGA_J2K


def test_read_mpp_csv(tmp_path):
    good = tmp_path / "mpp.csv"
    good.write_text("slide_id,mpp\nA,0.25\nB, 0.5\n")
    assert read_mpp_csv(good) == {"A": 0.25, "B": 0.5}
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("slide,um\nA,0.25\n")
    with pytest.raises(NicError, match="slide_id,mpp"):
        read_mpp_csv(wrong_columns)
    bad_value = tmp_path / "bad.csv"
    bad_value.write_text("slide_id,mpp\nA,-1\n")
    with pytest.raises(NicError, match="line 2"):
        read_mpp_csv(bad_value)


def test_cmu_svs_opens_with_cucim_and_reports_metadata():
    with open_slide(shared_path(*CMU)) as slide:
        described = slide.describe()
    assert described["reader"] == "cucim"
    assert (described["format"], described["vendor"]) == ("aperio", "aperio")
    assert (described["width"], described["height"]) == (2220, 2967)
    assert described["levels"] == [{"level": 0, "width": 2220, "height": 2967, "downsample": 1.0}]
    assert described["mpp"] == pytest.approx(0.499)
    assert described["slide_id"] == "CMU-1-Small-Region"
    json.dumps(described)


def test_slide_without_mpp_fails_require_mpp_with_the_fix():
    path = shared_path(*TCGA_J2K)
    with open_slide(path) as slide:
        with pytest.raises(SlideError) as caught:
            slide.require_mpp()
        with pytest.raises(SlideError):
            slide.read_regions_at_mpp([(0, 0)], 64, 1.0)
    message = str(caught.value)
    assert message.startswith(str(path)) and "--mpp" in message and "--mpp-csv" in message and "slide_id,mpp" in message


def test_mpp_override_wins_and_picks_levels():
    path = shared_path(*TCGA_J2K)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.require_mpp() == 0.25
        assert slide.level_for_mpp(0.25) == 0
        assert slide.level_for_mpp(0.5) == 1  # downsample 2.0005 is within tolerance of 2
        assert slide.level_for_mpp(0.4) == 0
    with open_slide(shared_path(*CMU), mpp=0.3) as slide:
        assert slide.mpp == 0.3


@pytest.mark.parametrize("reader", READERS)
def test_synthetic_pyramid_geometry_and_mpp(synthetic, reader):
    path, _ = synthetic
    with open_slide(path, reader=reader) as slide:
        assert slide.reader == reader and slide.format == "aperio"
        assert slide.dimensions == (1024, 1024) and slide.level_count == 3
        assert slide.level_dimensions == [(1024, 1024), (512, 512), (256, 256)]
        assert slide.level_downsamples == pytest.approx([1, 2, 4])
        assert slide.mpp == pytest.approx(0.5)


def test_nic_info_json_cmu_and_tcga():
    runner = CliRunner()
    cmu = runner.invoke(main, ["info", "--json", str(shared_path(*CMU))])
    assert cmu.exit_code == 0, cmu.output
    assert json.loads(cmu.output)["mpp"] == pytest.approx(0.499)
    tcga = runner.invoke(main, ["info", "--json", str(shared_path(*TCGA_J2K))])
    assert tcga.exit_code == 0, tcga.output
    described = json.loads(tcga.output)
    assert described["mpp"] is None and len(described["levels"]) == 2


def test_nic_info_text_and_mpp_override():
    result = CliRunner().invoke(main, ["info", "--mpp", "0.25", str(shared_path(*TCGA_J2K))])
    assert result.exit_code == 0
    assert "mpp: 0.25" in result.output and "1: 2221 x 1783" in result.output
