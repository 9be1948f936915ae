"""Command-line entry points (`saturate ...`), the synthetic ImageNet generator and the profiler: thin layers
over `shards/`, `pipeline/` and `training/`."""
