"""The one training loop: step, evaluation, metrics, checkpoints and resume."""
