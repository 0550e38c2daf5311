"""Training: the loop, its step and batches, replay and the base model as teacher, validation, checkpoints, the run report."""
