"""Datasets, the evaluation protocol (prompts, identifiers, seeds) and image loading."""
