"""tollgate's benchmarks: the recording proxy beside a direct connection,
socat and haproxy, in one run, on one machine, as ratios.

    python -m bench [--quick]      (root: network namespaces, nftables)

run.py measures, loadgen.c generates the load, storebench.py times the
store, verify and shipper, table.py prints the table.
"""
