"""Several processes, one stream: the worker group and the step layout (spec/parallel.md)."""
