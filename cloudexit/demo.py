"""`cloudexit demo`: the whole job on an embedded S3 server holding a synthetic PACS."""

from __future__ import annotations

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
    """Start SeaweedFS, upload a synthetic PACS, inventory it; return what was found."""
    from . import synthetic

    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="cloudexit-demo-"))
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
            if db_path.exists():
                db_path.unlink()
            url = f"s3://{DEMO_BUCKET}"
            import os
            os.environ.update(server.env())
            source = Source(url, SourceConfig(endpoint_url=server.endpoint_url))
            with State(db_path, create=True) as state:
                say(f"$ cloudexit inventory {url} --endpoint-url {server.endpoint_url} --db {db_path}")
                summary = Inventory(state, source, InventoryConfig()).run()
                totals = inventory_summary(state)
            say(f"Inventory: {totals['objects']} objects, {totals['dicom_instances']} DICOM instances "
                f"in {totals['studies']} studies of {totals['patients']} patients; "
                f"{totals['non_dicom']} non-DICOM, {totals['unreadable']} unreadable, "
                f"{totals['hostile_keys']} unsafe keys flagged.")
            say(f"State database: {db_path if not own else '(temporary)'}")
            return {"bucket": DEMO_BUCKET, "uploaded": len(objects), "round": summary.__dict__,
                    "inventory": totals}
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
