"""Data: the Parquet request schema, the synthetic generator, converters and loaders (PyArrow, Ray Data)."""
