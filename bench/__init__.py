"""Benchmarks (not timed tests): each is `python -m bench.<name>` and takes `--quick` for one JSON line.

    bench.featurize   featurization throughput vs the forward+backward floor, side by side with peers   (item 1)
    bench.query       query latency over HTTP, time split, scoring vs its memory-bandwidth floor, FAISS    (item 2)
    bench.audit       n x m x all layers scoring + rank / vote aggregation                                  (item 3)
    bench.memory      peak RSS while featurizing all SST-2 training rows into a store; bytes per row        (item 4)
    bench.growth      featurization and query cost vs n and vs number of layers                              (item 5)
    bench.scoring     the slowest stage (exact scoring, top-k, aggregation) against naive baselines     (item 6)

bench/load_query.py is a separate loopback load test of the query route (`python bench/load_query.py`).

Results and command lines: docs/benchmarks.md. Shared helpers: bench/common.py; the set-up the scripts share
with the benchmarks (SST-2, the embedded service as a child process): bench/harness.py.
"""
