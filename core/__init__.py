"""Shared by every stage: config, CLI, errors, atomic io, images, label files, datasets, transforms, model, checkpoints, W&B, launcher, demo data."""
