"""Training: trainer, schedules, checkpoints, distributed, and the hardware probe."""
