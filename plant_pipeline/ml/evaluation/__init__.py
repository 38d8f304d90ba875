"""Stage 4: evaluation. Scoring every category name for each test image, per-class metrics, plots.
"""
