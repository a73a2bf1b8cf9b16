"""Shared by every stage: config, CLI, errors, atomic files, images, label files, datasets,
transforms, model factory, checkpoints, W&B, the launcher and the demo data."""
