"""The command line as a user meets it: the command list and the encoder listing."""

from click.testing import CliRunner

from nic_models.registry import DEFAULT_ENCODER, list_encoders
from nic_pipeline.cli import main


def test_every_pipeline_step_has_a_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "synth", "compress", "inspect", "view", "encoders", "train-encoder", "embed", "probe",
                    "train", "predict", "heatmap", "demo", "cluster"):
        assert f"  {command} " in result.output


def test_encoders_lists_the_registry_and_marks_the_default():
    result = CliRunner().invoke(main, ["encoders"])
    assert result.exit_code == 0
    for name in list_encoders(include_aliases=False):
        assert name in result.output
    default_line = next(line for line in result.output.splitlines() if line.startswith(DEFAULT_ENCODER + " "))
    assert default_line.endswith("(= nic)")
    assert "Apache-2.0 AND MIT · commercial use: yes" in default_line
    assert default_line.count("(") == default_line.count(")")  # nothing cut mid-bracket
    v1 = next(line for line in result.output.splitlines() if line.startswith("nic-mtl-v1 "))
    assert "MIT AND CC-BY-NC-SA-4.0 · non-commercial use only · commercial use: no" in v1
    for clean in ("nic-mtl-v2-no-monuseg", "nic-mtl4-tellez2020", "efficientnet-lite0-imagenet"):
        line = next(line for line in result.output.splitlines() if line.startswith(clean + " "))
        assert "commercial use: yes" in line and "non-commercial" not in line, line
    own = next(line for line in result.output.splitlines() if line.startswith("resnet50-trunc "))
    assert "licence of your weights file" in own


def test_usage_errors_exit_2_and_a_missing_store_is_one_line():
    runner = CliRunner()
    assert runner.invoke(main, ["compress", "--out", "x.zarr"]).exit_code == 2  # no slide paths
    result = runner.invoke(main, ["inspect", "no-such-store.zarr"])
    assert result.exit_code == 2 and "no-such-store.zarr" in result.output
