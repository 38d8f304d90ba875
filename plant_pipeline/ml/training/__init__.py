"""Stage 3: training. The config and run identity, checkpoints, trainable parts and LoRA, collation,
streaming the shards, the CustomTrainer, and the command line torchrun launches.
"""
