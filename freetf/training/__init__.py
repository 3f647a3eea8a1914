"""Training: the one loop, its schedules, checkpoints, and the Ray Train wiring."""
