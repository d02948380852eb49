"""The training engine: the loop, the time budget, checkpoints and resume, seeding and the accelerator."""
