"""``./run.sh train``: setup, the epoch loop, full-state checkpoints and resume, the training loader."""
