"""Where and how things run: devices and precision, the NumPy/CuPy dispatch, the Dask cluster."""
