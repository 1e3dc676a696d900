"""Training: state, the jitted step, objectives, the optimizer, building a run, the loop and its hooks, checkpoints, run directories."""
