"""Compression: tissue, grid, the worker side, the task graph and the Zarr store."""
