"""The training engine: the task protocol it runs, the loop, parallelism, checkpoints, logging. Imports no task."""
