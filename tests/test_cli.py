"""The command line as a user meets it: the command list and the encoder listing."""

from click.testing import CliRunner

from nic_models.registry import DEFAULT_ENCODER, get_spec, list_encoders
from nic_pipeline.cli import main


def test_every_pipeline_step_has_a_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "synth", "compress", "inspect", "view", "encoders", "train-encoder", "embed", "probe",
                    "train", "predict", "heatmap", "demo"):
        assert f"  {command} " in result.output


def test_encoders_lists_the_registry_and_marks_the_default():
    result = CliRunner().invoke(main, ["encoders"])
    assert result.exit_code == 0
    for name in list_encoders(include_aliases=False):
        assert name in result.output
    default_line = next(line for line in result.output.splitlines() if line.startswith(DEFAULT_ENCODER + " "))
    assert default_line.endswith("(= nic)")
    licence = get_spec(DEFAULT_ENCODER).licence.split(";")[0]
    assert licence in default_line and "NC-SA" in licence  # the whole licence, not cut mid-word


def test_usage_errors_exit_2_and_a_missing_store_is_one_line():
    runner = CliRunner()
    assert runner.invoke(main, ["compress", "--out", "x.zarr"]).exit_code == 2  # no slide paths
    result = runner.invoke(main, ["inspect", "no-such-store.zarr"])
    assert result.exit_code == 2 and "no-such-store.zarr" in result.output
