"""resfast's benchmark scripts (run them as files: ``python benchmarks/bench_optim.py --help``)."""
