"""Stage 2: shards. Images and prompts preprocessed with the model's own processor, validated, and written
as WebDataset tar shards per split with an index; the checks that re-read them.
"""
