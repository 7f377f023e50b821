"""The language-modelling pipeline behind ``whiteboard train``: config and presets, data
and vocabulary, the model, training with exact resume, checkpoints in a run directory,
evaluation and generation."""
