"""Instances per second into Orthanc: cloudexit's C-STORE and STOW-RS stores vs DCMTK storescu.

    /work/venv/bin/python benchmarks/pacs.py --instances 500 --matrix 512

Makes N synthetic CT instances (512x512 16-bit: ~0.5 MB each) as files, then for each sender starts
a fresh Orthanc (tests/orthanc.py: own config, tmp storage, DICOMweb plugin) and times delivering
all files into it, from the first byte to the last acknowledgement:
* `storescu`: DCMTK `storescu +sd DIR` (one association, one file after another);
* `cstore-pN`: `CStoreStore.deliver` from N threads, as the migrate engine calls it;
* `stow-pN-bB`: `DicomwebStore.deliver` from N threads, batches of up to B instances.
Every run checks that Orthanc holds exactly N instances afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from cloudexit.testing import synthetic  # noqa: E402
from cloudexit.stores import Item  # noqa: E402
from cloudexit.stores.cstore import open_store as open_cstore  # noqa: E402
from cloudexit.stores.dicomweb import DicomwebStore  # noqa: E402
from orthanc import OrthancServer, write_objects  # noqa: E402


def _threads(deliver: Callable[[Item, str], Any], items: list[tuple[Item, str]], n: int) -> None:
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda pair: deliver(*pair), items))
    bad = [r for r in results if not r.ok]
    assert not bad, bad[:3]


def run_one(name: str, items: list[tuple[Item, str]], folder: Path, work: Path) -> dict[str, Any]:
    with OrthancServer(work / name) as server:
        start = time.perf_counter()
        if name == "storescu":
            subprocess.run(["storescu", "-aet", "CLOUDEXIT", "-aec", server.aet, "+sd",
                            "127.0.0.1", str(server.dicom_port), str(folder)], check=True, capture_output=True)
        elif name.startswith("cstore"):
            parallel = int(name.split("-p")[1])
            pairs = {(i.sop_class_uid or "", i.transfer_syntax or "") for i, _ in items}
            store = open_cstore(server.dicom_url, parallel=parallel, contexts=pairs)
            _threads(store.deliver, items, parallel)
            store.close()
        else:
            parallel, batch = (int(x) for x in name[len("stow-p"):].split("-b"))
            store = DicomwebStore(server.dicomweb_url[len("dicomweb+"):], parallel=parallel, batch_size=batch)
            _threads(store.deliver, items, parallel)
            store.close()
        seconds = time.perf_counter() - start
        count = server.instance_count()
    assert count == len(items), (name, count)
    size = sum(i.size for i, _ in items)
    return {"sender": name, "instances": len(items), "seconds": round(seconds, 2),
            "instances_per_s": round(len(items) / seconds, 1), "MB_per_s": round(size / seconds / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--senders", default="storescu,cstore-p1,cstore-p4,stow-p8-b8,stow-p16-b16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cloudexit-pacs-bench-") as tmp:
        work = Path(tmp)
        folder = work / "files"
        objects = synthetic.generate(synthetic.Profile.ct_bench(args.instances, matrix=args.matrix))
        items = write_objects(objects, folder)
        results = [run_one(name, items, folder, work) for name in args.senders.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    mb = sum(i.size for i, _ in items) / len(items) / 1e6
    print(f"{args.instances} CT instances of {mb:.2f} MB into Orthanc 1.10 on 127.0.0.1")
    print(f"{'sender':<16}{'seconds':>9}{'inst/s':>9}{'MB/s':>8}")
    for r in results:
        print(f"{r['sender']:<16}{r['seconds']:>9}{r['instances_per_s']:>9}{r['MB_per_s']:>8}")


if __name__ == "__main__":
    main()
