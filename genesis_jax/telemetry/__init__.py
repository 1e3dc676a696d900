"""Where a run's numbers go: the sink protocol and one module per backend (SQLite, TensorBoard, console)."""
