"""The front door and its defaults: one list of names, and one home for each default that every
door (CLI, Python API, demo) reads."""

import inspect
import subprocess
import sys

import click

import nic_pipeline as nic


def test_front_door_names_are_one_list_and_compress_is_the_function():
    assert nic.__all__ == [*nic._HOMES, "__version__"]
    import nic_pipeline.api as api
    import nic_pipeline.compress.graph  # noqa: F401 - loading a module of the subpackage must not rebind the name

    assert api.__all__ == list(nic._HOMES)
    assert inspect.isfunction(nic.compress) and nic.compress is api.compress
    assert nic.compress.__module__ == "nic_pipeline.compress.api"


def test_front_door_import_stays_light():
    code = "import sys, nic_pipeline; print(any(m in sys.modules for m in ('torch', 'dask', 'distributed')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_every_door_reads_the_one_default_slide_model():
    from nic_models.slide_models.registry import DEFAULT_SLIDE_MODEL
    from nic_pipeline.classify import api, graph
    from nic_pipeline.cli import main
    from nic_pipeline.demo import DemoSpec

    assert inspect.signature(api.train).parameters["model"].default == DEFAULT_SLIDE_MODEL
    assert inspect.signature(graph.train_cohort).parameters["model"].default == DEFAULT_SLIDE_MODEL
    assert DemoSpec().model == DEFAULT_SLIDE_MODEL
    for command in ("train", "demo"):
        option = next(p for p in main.commands[command].params if p.name == "model")
        assert option.get_default(click.Context(main.commands[command])) == DEFAULT_SLIDE_MODEL
        if command == "train":  # its help names the value, which `nic train --help` shows
            assert f"default: {DEFAULT_SLIDE_MODEL}, the registry's DEFAULT_SLIDE_MODEL" in option.help


def test_compress_defaults_have_one_home():
    from nic_pipeline.cli import main
    from nic_pipeline.compress import api, graph
    from nic_pipeline.compress.grid import DEFAULT_BLOCK, DEFAULT_MIN_TISSUE
    from nic_pipeline.compress.store import CompressionConfig
    from nic_pipeline.compress.tissue import DEFAULT_MASK_MPP

    config = CompressionConfig("e", "", 1, 0.5, 128, 128)
    assert (config.block, config.min_tissue, config.mask_mpp) == (DEFAULT_BLOCK, DEFAULT_MIN_TISSUE, DEFAULT_MASK_MPP)
    for function in (api.compress, graph.compress):
        params = inspect.signature(function).parameters
        assert (params["block"].default, params["min_tissue"].default) == (DEFAULT_BLOCK, DEFAULT_MIN_TISSUE)
    assert inspect.signature(graph.compress).parameters["mask_mpp"].default == DEFAULT_MASK_MPP
    options = {p.name: p.default for p in main.commands["compress"].params}
    assert (options["block"], options["min_tissue"]) == (DEFAULT_BLOCK, DEFAULT_MIN_TISSUE)
