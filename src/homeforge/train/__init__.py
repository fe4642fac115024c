"""Training: data iteration, optimizer and schedule, the loop, checkpoints."""
