"""One migration across many machines, on dask.distributed (`migrate --cluster`).

A package of its own, not a module of engine/: it is the only code that needs the optional
extra `cloudexit[cluster]` (dask.distributed), and half of it runs on other machines (the dask
workers), which import `service.py` and nothing of the engine. The coordinator side is
`DaskExecutor` (executor.py), an `Executor` (engine/executor.py) like the local process pool;
`address.py` reads `--cluster` and holds the rule on forwarding credentials. See
docs/scale-out.md.
"""
