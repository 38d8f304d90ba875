"""The pure ML core: data download, preprocessing, shards, training and evaluation.

Nothing in this package imports dagster, so every piece runs under pytest, a script or torchrun alone.
"""
