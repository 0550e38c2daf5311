"""Training: a run's options, the loop, its step and batches, replay and the base model as teacher, validation, checkpoints, the final evaluation and the run report."""
