"""Stage 1: the data. Downloading and safely extracting the Oxford release, its manifest of image, label
and split, the categories, the synthetic demo release, and photos users drop into incoming/.
"""
