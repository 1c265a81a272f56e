"""One migration across many machines, on dask.distributed (`migrate --cluster`, `inventory
--cluster`).

A package of its own, not a module of engine/: it is the only code that needs the optional
extra `cloudexit[cluster]` (dask.distributed), and half of it runs on other machines (the dask
workers), which import `service.py` / `headerservice.py` and, of the engine, only its local
process pool (engine/local.py). The
coordinator side of migrate is `DaskExecutor` (executor.py), an `Executor` (engine/executor.py)
like the local process pool; of inventory, `ClusterHeaders` (headers.py), which reads headers as
the inventory's own threads would. `connect.py` opens the client and admits workers for both;
`address.py` reads `--cluster` and holds the rule on forwarding credentials. See
docs/scale-out.md.
"""
