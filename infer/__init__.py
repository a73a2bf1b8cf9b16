"""Inference: defended models, ensembles and TTA, submission files and their checks."""
