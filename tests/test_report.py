"""The report hospital management reads: the demo's awkward bucket (synthetic.Profile.demo(): a
truncated instance, a SOP Instance UID conflict, non-DICOM files) and a zipped study inventoried, planned and
migrated for real into two archives, then `cloudexit audit` and `cloudexit plan` in English
and Chinese. Every total of audit.json is checked against the others; the Chinese pages are
read in headless Chromium for English left untranslated; page 1 of the printed audit is the
director's summary (pdftotext)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cloudexit.testing import synthetic
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer

SCHEDULE = "Mon-Sun 07:30,0 19:00,off"


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def exited(s3: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Profile.demo() in SeaweedFS, inventoried, planned, migrated into archives A and B,
    audited and planned in both languages."""
    from conftest import point_at

    from cloudexit.core.config import MigrateConfig, SourceConfig
    from cloudexit.engine.migrate import Migration
    from cloudexit.s3.source import Source
    from cloudexit.state.db import State
    from cloudexit.stores.filesystem import FilesystemStore

    mp = pytest.MonkeyPatch()
    point_at(s3, mp)
    bucket = f"report-{os.getpid()}"
    s3.client().create_bucket(Bucket=bucket)
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.demo()))
    # A zipped study (three CT files in one zip, as viewers export them): the audit counts the zip
    # once among the bucket's objects and the files inside apart, as status and plan do.
    zipped = [o for o in synthetic.generate(synthetic.Profile(
        patients=1, studies_per_patient=1, ct_series_per_study=1, ct_slices_per_series=3, ct_matrix=64,
        cr_per_study=0, multiframe_objects=0, awkward=False, layouts=("uid",), seed=77)) if o.kind == "dicom"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, o in enumerate(zipped):
            archive.writestr(f"IM{i}.dcm", o.body())
    s3.client().put_object(Bucket=bucket, Key="zipped/study.zip", Body=buf.getvalue())
    root = tmp_path_factory.mktemp("report")
    db = root / "cloudexit.db"
    assert run("inventory", f"s3://{bucket}", "--db", db, "-q").exit_code == 0
    plan = ("plan", "--db", db, "--provider", "aliyun-oss", "--region", "cn-hangzhou",
            "--bandwidth", "100Mbit/s", "--schedule", SCHEDULE, "-q")
    assert run(*plan).exit_code == 0
    r = run("migrate", "--to", root / "a", "--db", db, "--processes", "1", "--threads", "4", "-q")
    assert r.exit_code == 3, r.output  # the truncated object and the conflict: quarantined
    with State(db) as state:  # the same objects into a second destination
        source = Source(f"s3://{bucket}", SourceConfig(endpoint_url=s3.endpoint_url))
        Migration(state, source, FilesystemStore(root / "b"), MigrateConfig()).run()
    for lang in ("en", "zh"):
        r = run("audit", "--db", db, "--out", root / f"audit-{lang}", "--lang", lang)
        assert r.exit_code == 3, r.output
        r = run(*plan, "--lang", lang, "--out", root / f"plan-{lang}.html")
        assert r.exit_code == 0, r.output
        r = run(*plan, "--lang", lang, "--assume-size", "40TB", "--out", root / f"plan-40TB-{lang}.html")
        assert r.exit_code == 0, r.output
    yield {"truth": truth, "root": root, "db": db, "zipped": zipped, "zip": buf.getvalue()}
    mp.undo()


def facts_of(m: dict[str, Any], lang: str = "en") -> dict[str, Any]:
    return json.loads((m["root"] / f"audit-{lang}" / "audit.json").read_text())


def test_every_total_agrees_with_the_others(exited) -> None:
    """One definition per number: breakdowns add up to their totals, each destination's column
    adds up to the source, and the headline, the table and the exception list say the same."""
    f, truth = facts_of(exited), exited["truth"]
    src, x = f["source"], f["exceptions"]
    dicom = [o for o in truth if o.kind == "dicom"]
    zipped, zip_bytes = exited["zipped"], exited["zip"]
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:  # each file's bytes as stored in the zip
        in_zip = sum(i.compress_size for i in archive.infolist())
    # Objects: every key in the bucket once (the zip once), by kind; the files inside the zip apart.
    assert src["objects"] == len(truth) + 1
    assert (src["zip_archives"], src["zip_archives_not_unpacked"], src["zip_files"]) == (1, 0, len(zipped))
    assert src["objects"] + src["zip_files"] == (src["dicom_objects"] + src["non_dicom"] + src["unreadable"]
                                                 + src["pending"])
    assert sum(c["objects"] for c in src["storage_classes"]) == src["objects"]
    assert sum(c["bytes"] for c in src["storage_classes"]) == src["bytes"]
    assert src["bytes"] == sum(o.size for o in truth) + len(zip_bytes)
    # DICOM objects (the files inside the zip too): what the charts by modality and by study year
    # add up to, a file inside the zip with its bytes in the zip (not 0 B, and not the zip's again).
    for chart in ("by_modality", "by_study_year"):
        rows = f["charts"][chart]
        assert sum(r["objects"] for r in rows) == src["dicom_objects"] == len(dicom) + len(zipped), chart
        assert sum(r["bytes"] for r in rows) == src["dicom_bytes"] == sum(o.size for o in dicom) + in_zip, chart
    # Instances: distinct SOP Instance UIDs; the duplicate's second copy is the difference.
    assert src["instances"] == len({o.sop_uid for o in dicom + zipped})
    assert src["instances"] == src["dicom_objects"] - src["duplicate_copies"]
    assert src["duplicate_copies"] == 1
    # Each destination: its column adds up to the objects sent there.
    dests = f["destinations"]
    assert len(dests) == 2
    for d in dests:
        name = d["dest"]
        # the zip whose files were copied is skipped itself (its files are held instead)
        held = sum(v["objects"] for v in d["by_state"].values()) - src["zip_archives"]
        assert d["by_state"]["skipped"]["objects"] == src["zip_archives"], name
        assert d["objects"] + d["quarantined"]["objects"] == held, name
        assert d["quarantined"]["objects"] == x["quarantined"]["by_dest"][name] + x["conflicts"]["by_dest"][name]
        assert d["quarantined"]["objects"] == 2, name  # the truncated object and one conflict copy
        assert d["dicom_objects"] <= src["dicom_objects"] and d["instances"] == src["instances"], name
        for cat in ("failed", "missing", "unfinished"):
            assert x[cat]["by_dest"][name] == d["by_state"].get(cat, {}).get("objects", 0), (name, cat)
        assert x["skipped"]["by_dest"][name] == 0, name
    # The headline: objects in quarantine anywhere, each once (it said 4 here: 2 per archive).
    [review] = [r for r in f["verdict"]["reasons"] if r["code"] == "quarantined"]
    assert review["n"] == 2 == x["quarantined"]["count"] + x["conflicts"]["count"]
    assert x["quarantined"]["bytes"] + x["conflicts"]["bytes"] == dests[0]["quarantined"]["bytes"]
    # Decommission readiness sorts every object of the bucket the inventory knows into one row
    # (the zip by its files: safe once each is verified everywhere); the files apart.
    rows = f["decommission"]["rows"]
    assert sum(r["objects"] for r in rows) == src["objects"] + src["deleted_at_source"]
    assert sum(r["objects"] for r in f["decommission"]["zip_files"]) == src["zip_files"]
    assert sum(r["bytes"] for r in rows if r["decision"] != "gone") == src["bytes"]
    # The manifest lists one row per object and destination.
    assert f["manifest"]["rows"] >= src["objects"]
    # Both languages: the same facts.
    zh = facts_of(exited, "zh")
    for key in ("source", "destinations", "exceptions", "verdict", "decommission", "charts"):
        assert json.dumps(zh[key], sort_keys=True) == json.dumps(f[key], sort_keys=True), key


def test_the_page_shows_the_numbers_of_the_json(exited) -> None:
    """The director's page repeats figures of the sections after it (same definitions), and the
    headline's quarantine figure is the table's."""
    page = (exited["root"] / "audit-en" / "audit.html").read_text()
    front = page.split('<section id="front"', 1)[1].split("</section>", 1)[0]
    rest = page.split("</section>", 1)[1]
    numbers = re.findall(r'data-v="([^"]*)"', front)
    assert numbers and all(f'data-v="{n}"' in rest for n in numbers), numbers
    assert "2 object(s) are quarantined for review" in re.sub(r"<[^>]+>", "", front)
    assert "How we count" in page and "DICOM objects" in page
    # the zipped study in the words of status and plan (core/i18n.py), in both languages
    assert "Zipped studies: 3 files inside 1 zip archives." in page, page
    zh = (exited["root"] / "audit-zh" / "audit.html").read_text()
    assert "ZIP 打包的检查：1 个 ZIP 压缩包中的 3 个文件。" in zh


def test_the_actual_cost_counts_each_zip_once_per_destination(exited) -> None:
    """Restore requests and minimum billable sizes are per object of the bucket: the actual cost's
    workload counts the zip once per archive it was copied into, not each file inside it; the
    files are fetches (a ranged GET each), as the plan counts them."""
    from cloudexit.core.states import COPIED, sql_in
    from cloudexit.report.cost import actual_classes
    from cloudexit.report.groups import Rule, grouped
    from cloudexit.state.db import State

    with State(exited["db"]) as state:
        _, tgroups = grouped(state, Rule.of(state))
        plain = state.scalar("SELECT count(*) FROM transfers t JOIN objects o ON o.key = t.key "
                             f"WHERE o.container IS NULL AND t.state IN {sql_in(COPIED)}")
        files = state.scalar("SELECT count(*) FROM transfers t JOIN objects o ON o.key = t.key "
                             f"WHERE o.container IS NOT NULL AND t.state IN {sql_in(COPIED)}")
        loads = list(actual_classes(state, tgroups, 10**6, 0).values())
    assert files == 2 * len(exited["zipped"])  # each file into both archives
    assert sum(c.objects for c in loads) == plain + 2  # the zip, once per archive
    assert sum(c.zips_unpacked for c in loads) == 2 and sum(c.zip_files for c in loads) == files
    assert sum(c.fetches for c in loads) == plain + files
    assert facts_of(exited)["cost"]["actual"]["cost"] is not None


# Words that may stay as they are in the Chinese pages: units, protocol and standard names,
# proper names, file and command names (code spans are left out before the check).
ALLOWED = {
    "B", "kB", "MB", "GB", "TB", "PB", "s", "ms", "min", "h", "d", "bit", "Mbit", "Gbit", "UTC",
    "cloudexit", "Orthanc", "SeaweedFS", "Alibaba", "Amazon", "Azure", "Blob", "Google", "Cloud",
    "Storage", "Huawei", "Tencent", "ETag", "SOP", "Instance", "UID", "Study", "Series", "CNY", "USD",
    "Asia", "Shanghai", "DeleteObjects", "Snowball", "Edge", "Support", "csv", "json", "jsonl", "html", "md", "png",
    "zlib", "gzip",  # the formats a PACS stores instances in (the decoded row)
    # the timetable exactly as the operator typed it (`--schedule`)
    "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "off",
}
_VISIBLE = """(() => {
  const copy = document.body.cloneNode(true);
  // code: keys, paths, hosts, commands; .fingerprint: a SHA-256 in hex
  copy.querySelectorAll('code, time, style, script, title, .fingerprint').forEach(e => e.remove());
  document.body.replaceWith(copy);
  return document.body.innerText;
})()"""


def english_left(text: str) -> list[str]:
    """Phrases of Latin letters in `text` that are not units, acronyms, names or code."""
    found = []
    for phrase in re.findall(r"[A-Za-z][A-Za-z'.\-/_]*(?:[ ,:]+[A-Za-z][A-Za-z'.\-/_]*)*", text):
        words = [w for w in re.split(r"[ ,:]+", phrase) if w]
        bad = [w for w in words if not (w in ALLOWED or w.isupper() or re.search(r"[\d./_-]", w)
                                        or re.fullmatch(r"[A-Z]+[0-9]*[A-Z]*s?", w))]
        if bad:
            found.append(phrase)
    return found


def test_english_left_finds_english() -> None:
    assert english_left("已完成 88.8 MB，DICOM 实例 SHA-256 Mon-Sun 07:30 CT MR kB/s UTC") == []
    assert english_left("原因：truncated: pixel data declares 5 bytes") == ["truncated: pixel data declares", "bytes"]
    assert english_left("状态 resumed，nominal usable") == ["resumed", "nominal usable"]


@pytest.mark.slow  # Chromium prints each page
@pytest.mark.parametrize("page", ["audit-zh/audit.html", "plan-zh.html", "plan-40TB-zh.html"])
def test_chinese_pages_have_no_english_left(exited, page: str, tmp_path: Path) -> None:
    from chromium_pipe import CHROMIUM, render

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package `chromium`): cannot render the pages")
    seen = render((exited["root"] / page).as_uri(), evaluate=_VISIBLE)
    assert seen["errors"] == []
    text = seen["value"]
    assert len(re.findall(r"[\u4e00-\u9fff]", text)) > 300
    assert english_left(text) == []


@pytest.fixture(scope="module")
def printed(exited, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both audits printed to A4 by Chromium (Page.printToPDF, as its --print-to-pdf does)."""
    from chromium_pipe import CHROMIUM, render

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package `chromium`): cannot print the audit")
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext is not installed (Debian package `poppler-utils`): cannot read the PDF")
    out = tmp_path_factory.mktemp("printed")
    pdfs = {}
    for lang in ("en", "zh"):
        pdfs[lang] = out / f"audit-{lang}.pdf"
        render((exited["root"] / f"audit-{lang}" / "audit.html").as_uri(), pdf=pdfs[lang])
    return pdfs


def page_text(pdf: Path, page: int) -> str:
    return subprocess.run(["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(pdf), "-"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow  # Chromium prints the audit
@pytest.mark.parametrize("lang, phrases", [
    ("en", ["Summary for management", "Complete, with exceptions to review", "What was moved",
            "117 objects", "Cost and time", "Exceptions to review", "Quarantined", "Next step"]),
    ("zh", ["管理层摘要", "已完成，有例外需复核", "迁移了什么", "117 个对象", "费用与时间", "需复核的例外",
            "已隔离", "下一步"]),
])
def test_page_one_is_the_directors_summary(printed, lang: str, phrases: list[str]) -> None:
    first, second = page_text(printed[lang], 1), page_text(printed[lang], 2)
    squeezed = re.sub(r"\s+", "", first)
    for phrase in phrases:
        assert re.sub(r"\s+", "", phrase) in squeezed, phrase
    # The summary ends on page 1: its last line is there, and the sections start on page 2.
    assert ("on the following pages" in first) if lang == "en" else ("后续各页" in squeezed)
    assert ("1. Summary" in second) if lang == "en" else ("一、概要" in second)


def test_chart_legend_leaves_room_for_chinese_labels() -> None:
    """A CJK character is a full em wide: the next swatch starts after the label's last one
    (it was placed 7 px per character, over the last character of 已完成)."""
    from cloudexit.core import charts

    svg = charts.hbars([("2016", 1.0, 2.0, "1 B / 2 B")], "按检查年份的进度（字节）",
                       [(charts.DONE, "已完成"), (charts.TODO, "未完成"), (charts.BAR, "每 1 s")])
    swatches = [float(x) for x in re.findall(r'<rect x="([\d.]+)" y="\d+" width="10"', svg)]
    labels = re.findall(r'<text x="([\d.]+)" y="\d+">([^<]+)</text>', svg)[-3:]
    assert [label for _x, label in labels] == ["已完成", "未完成", "每 1 s"] and len(swatches) == 3
    for (x, label), next_swatch in zip(labels, swatches[1:]):
        wide = sum(11 if ord(ch) > 0x2E80 else 6 for ch in label)  # 11 px font
        assert float(x) + wide < next_swatch, label
