"""Experiment tracking: MLflow on rank 0, a no-op tracker everywhere else."""
