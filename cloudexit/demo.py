"""`cloudexit demo`: the whole job on an embedded S3 server holding a synthetic PACS."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .config import InventoryConfig, SourceConfig
from .inventory import Inventory
from .s3server import SeaweedServer
from .source import Source
from .state import State
from .status import inventory_summary

DEMO_BUCKET = "branch-hospital-pacs"


def run_demo(workdir: str | None = None, size: str = "demo",
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start SeaweedFS, upload a synthetic PACS, inventory it; return what was found.

    `workdir` keeps the state DB (and what later steps write) after the demo; it is reset at
    the start of each run. None: a temporary directory, removed after.
    """
    from . import synthetic

    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="cloudexit-demo-"))
    for stale in ("s3", "cloudexit.db", "cloudexit.db-wal", "cloudexit.db-shm"):
        target = root / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with SeaweedServer(root / "s3") as server:
            say(f"Embedded S3 server (SeaweedFS) at {server.endpoint_url}")
            profile = synthetic.Profile.demo() if size == "demo" else synthetic.Profile.tiny()
            objects = synthetic.upload(server.client(), DEMO_BUCKET, synthetic.generate(profile))
            total = sum(o.size for o in objects)
            say(f"Uploaded a synthetic PACS: {len(objects)} objects, {total / 1e6:.1f} MB "
                f"into s3://{DEMO_BUCKET}")
            db_path = root / "cloudexit.db"
            url = f"s3://{DEMO_BUCKET}"
            os.environ.update(server.env())
            source = Source(url, SourceConfig(endpoint_url=server.endpoint_url))
            with State(db_path, create=True) as state:
                say(f"$ cloudexit inventory {url} --endpoint-url {server.endpoint_url} --db {db_path}")
                summary = Inventory(state, source, InventoryConfig()).run()
                totals = inventory_summary(state)
            say(f"State database: {db_path if not own else '(temporary)'}"
                + (f"  (look again with: cloudexit status --db {db_path})" if not own else ""))
            return {"bucket": DEMO_BUCKET, "uploaded": len(objects), "round": summary.__dict__,
                    "inventory": totals}
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
