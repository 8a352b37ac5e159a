"""Evaluation: feature extractors (extractors.py), metrics as pure functions over their features
(metrics.py) and the fixed prompt sets (prompts.py, data/eval/prompts.json)."""
