"""Words shared by the audit and the plan, in English and Chinese (one glossary for both).

The plan model and the state DB write English (plan JSON, transfer reasons, run states); a
report in Chinese translates them here, by exact phrase or by pattern, so both documents use
the same word for the same thing. `phrase(text, "zh")` gives the Chinese, or None when no entry
matches (the caller then shows a generic label and keeps the English in a tooltip), and
`reason(text)` gives a transfer reason's machine code for that tooltip.
"""

from __future__ import annotations

import re
from collections.abc import Callable

LANGS = ("en", "zh")

# Exact phrases: plan scenario titles and items, run and round states, verify/deletion states.
PHRASES: dict[str, str] = {
    # plan scenarios (keys and titles)
    "fastest": "最快方案",
    "cheapest": "最省钱方案",
    "within_schedule": "按医院时间表",
    "free_exit": "免费迁出",
    "offline_device": "离线设备",
    "Fastest: full link, fastest restores": "最快：满速使用链路，最快解冻",
    "Cheapest": "最省钱",
    "Within the hospital's timetable": "按医院规定的时间表",
    "Offline device": "离线设备",
    # link
    "given": "指定值",
    "actual": "实际",
    # states of runs, rounds, sessions
    "started": "开始",
    "resumed": "续传",
    "finished": "正常结束",
    "interrupted": "被中断",
    "stopped": "已停止",
    "killed": "被强行终止",
    "running": "运行中",
    "complete": "完成",
    "partial": "部分完成",
    "failed": "失败",
    "incomplete": "不完整",
    "dry_run": "预演",
    "refused": "被拒绝",
    "executed": "已执行",
    "off": "未启用",
    "enabled": "已启用",
    "suspended": "已暂停",
    "passed": "通过",
    "error": "出错",
    # `cloudexit verify` findings: what and where
    "object not-delivered": "对象未送达",
    "study missing": "检查缺失", "study count": "检查实例数不符",
    "series missing": "序列缺失", "series count": "序列实例数不符", "series extra": "多出的序列",
    "instance missing": "实例缺失", "instance extra": "多出的实例",
    "file missing": "文件缺失", "file not-a-file": "不是普通文件", "file size": "文件大小不符",
    "file sha256": "文件 SHA-256 不符", "file extra": "多出的文件",
    # a check not possible for a file inside a zip (transfer/zipmember.py NOT_CHECKED)
    "object MD5/ETag: a member of a zip is read by range, so the zip's whole-object checksum cannot be "
    "compared; the member's CRC-32 from the zip's directory is checked":
        "对象 MD5/ETag：ZIP 压缩包中的文件按范围读取，无法与整个压缩包的校验和比对；已核对压缩包目录中该文件的 CRC-32",
    # bucket versioning, as the deletion proof shows it
    "versioned": "已启用",
    # plan: assumptions and warnings that take no figures
    "no timetable: the full link around the clock": "无时间表：全天满速使用链路",
    "no timetable: the full link": "无时间表：满速使用链路",
    "restore tiers: the cheapest for each class": "解冻档位：每种存储类型取最便宜的档位",
    "no time-of-day prices: the cheapest hours are all hours": "无分时段价格：任何时段价格相同",
    "the inventory's header reads are billed in the first month; its requests are listed as already spent":
        "清点读取文件头的流量计入第一个月；其请求列为已发生费用",
    "range: low = best throughput and shortest restores; high = worst throughput, longest restores and "
    "minimum billable sizes": "范围：低值 = 最佳吞吐量和最短解冻时间；高值 = 最差吞吐量、最长解冻时间和最小计费大小",
    "the timetable never allows transfer in the cheap hours": "时间表在低价时段从不允许传输",
    "the exit program's window is unknown: credit assumes everything is inside it":
        "迁出计划的期限未知：返还按全部数据都在期限内计算",
    "data counts as moved when the device is back": "设备寄回时数据才算迁出",
    # cost lines
    "GET requests (one per object, one per part, one per file inside a zip)":
        "GET 请求（每个对象一次，分段对象每段一次，ZIP 压缩包中的每个文件一次）",
    "free allowance": "免费额度",
    "egress": "外网流出流量",
    "egress, other hours": "外网流出流量（其他时段）",
    "inventory LIST requests (already spent)": "清点 LIST 请求（已发生）",
    "inventory header GETs (already spent)": "清点读取文件头的 GET 请求（已发生）",
    "device jobs": "设备任务",
    "data onto the device": "写入设备的数据",
    "exit program credit": "迁出计划返还",
    "unverified price": "价格未经核实",
    "unknown": "未知",
    "requests": "次请求",
    "jobs": "个任务",
    "1,000 requests": "千次请求",
    "job": "个任务",
    # audit: why no actual cost
    "no plan": "没有迁移计划",
    "nothing downloaded yet": "尚未下载任何数据",
    "the model gave no cost": "模型未给出费用",
    "not queued for every destination": "未排入全部目标位置",
}

# Provider catalogue titles and programs (proper names stay, descriptions are translated).
PHRASES.update({
    "Alibaba Cloud OSS, mainland China": "阿里云 OSS（中国内地）",
    "Amazon S3, us-east-1": "Amazon S3（us-east-1）",
    "Azure Blob Storage, Microsoft network routing": "Azure Blob 存储（微软网络路由）",
    "Google Cloud Storage, premium tier to the Americas and EMEA": "Google Cloud Storage（高级网络，至美洲及欧非中东）",
    "Huawei Cloud OBS, mainland China": "华为云 OBS（中国内地）",
    "Tencent Cloud COS, mainland China": "腾讯云 COS（中国内地）",
    "Alibaba Cloud Data Transport": "阿里云闪电立方",
    "exists; export from OSS to a device not confirmed. Data Online Migration lists OSS to a local file "
    "system, with source traffic fees": "服务存在，但能否从 OSS 导出到设备未经确认；在线迁移服务支持从 OSS 迁到本地文件系统，需付源端流量费",
    "AWS Snowball Edge export": "AWS Snowball Edge 设备导出",
    "closed to new customers from 7 Nov 2025; export jobs are split into parts of at most 210 TB":
        "自 2025 年 11 月 7 日起不再接受新客户；导出任务按每份最多 210 TB 拆分",
    "AWS free data transfer out when leaving AWS (March 2024)": "AWS 迁出免流量费计划（2024 年 3 月）",
    "Azure free egress when leaving Azure (March 2024)": "Azure 迁出免流量费计划（2024 年 3 月）",
    "Google Cloud free exit": "Google Cloud 免费迁出计划",
    "approved on request through AWS Support; paid as credits; all data must leave within the window":
        "须经 AWS Support 申请批准；以抵扣金返还；全部数据须在期限内迁出",
    "support request first; 60 days to move the data; credit applied after the subscription is cancelled":
        "须先提交支持请求；60 天内迁出数据；取消订阅后返还抵扣金",
    "notice to Google first, then a migration window; paid as credits": "须先通知 Google，随后进入迁移期；以抵扣金返还",
})

Pattern = tuple[re.Pattern[str], str]


def _p(english: str, chinese: str) -> Pattern:
    """A pattern from an English template: `{name}` matches any text (as little as it can)."""
    parts = re.split(r"\{(\w+)\}", english)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(rf"^{rx}$", re.DOTALL), chinese


# Templates: fields named t_* are translated too; the others are kept (figures, names, code).
PATTERNS: list[Pattern] = [
    # plan titles and reasons
    _p("Free exit: {t_name}", "免费迁出：{t_name}"),
    _p("Offline device: {t_name}", "离线设备：{t_name}"),
    _p("no device export with known terms for {provider}: ask for a quote",
       "{provider} 没有条款明确的设备导出服务：请向厂商询价"),
    # link
    _p("nominal {rate}, {shares} usable", "标称 {rate}，可用 {shares}"),
    _p("measured {at} on {n} objects", "于 {at} 对 {n} 个对象实测"),
    _p("measured {at} by migrating a sample of {n} objects", "于 {at} 以迁移引擎迁移 {n} 个样本对象实测"),
    _p("measured {at} from the migration's runs, {s} s of transfer", "于 {at} 按本次迁移任务实测（传输 {s} 秒）"),
    _p("measured {at} with a boto3 sample of {n} objects", "于 {at} 用 boto3 抽样 {n} 个对象实测"),
    _p("{t_source}; capped by the provider", "{t_source}；受云厂商限速"),
    # plan assumptions
    _p("prices: {t_title} ({t_file}), in {currency}", "价格：{t_title}（{t_file}），单位 {currency}"),
    _p("link: {t_source}; usable {low} to {high}, expected {expected}",
       "链路：{t_source}；可用 {low} 至 {high}，预计 {expected}"),
    _p("{n} parallel requests, {ms} ms latency each, {gets} GETs (one per object, one per part of "
       "multipart objects, one per file inside a zip instead of the zip)",
       "{n} 个并行请求，每个延迟 {ms} ms，共 {gets} 次 GET（每个对象一次，分段对象每段一次，ZIP 压缩包中的每个文件一次，而非整个压缩包）"),
    _p("{t_base}; latency and the client's own work are in the measured rate",
       "{t_base}；延迟与客户端自身开销已包含在实测速率中"),
    _p("1 GB = {n} bytes", "1 GB = {n} 字节"),
    _p("{s} s to start the run before the first byte", "开始传输前启动约需 {s} 秒"),
    _p("the client's CPU caps the rate at {rate} with {n} worker processes ({ms} ms per object, {gb} s "
       "per GB on one core)", "客户端 CPU 将速率限制在 {rate}（{n} 个工作进程；单核每个对象 {ms} ms、每 GB {gb} 秒）"),
    _p("egress tiers restart every calendar month; {t_free}", "流量阶梯每个自然月重新计算；{t_free}"),
    _p("no free egress allowance ({n} GB per month)", "没有免费流量额度（每月 {n} GB）"),
    _p("the free allowance covers the first {n} GB of each month and counts toward the first tier",
       "免费额度抵扣每月前 {n} GB，并计入第一档"),
    _p("the free allowance is unknown: counted as {n} GB", "免费额度未知：按 {n} GB 计算"),
    _p("times are read on one clock: the start time is taken to be {tz}, the provider's billing clock "
       "(give a timezone-aware start to convert)", "所有时间按同一时钟：开始时间视为 {tz}，即云厂商的计费时钟（给出带时区的开始时间可换算）"),
    _p("billing months and price hours on {tz}; timetable on the start's clock",
       "计费月份和分时段价格按 {tz}；时间表按开始时间的时钟"),
    _p("{n} prices or times are unknown; prices count as 0 (listed): supply a --price-file",
       "{n} 项价格或时间未知，价格按 0 计算（见列表）：请提供 --price-file"),
    _p("timetable: {text}", "时间表：{text}"),
    _p("exit program: {t_conditions}", "迁出计划：{t_conditions}"),
    _p("transfer only {hours} {tz} (cheaper price {price} {currency}/GB)",
       "仅在 {hours}（{tz}）传输（低价 {price} {currency}/GB）"),
    _p("{cls}: {tier} restore, time unknown (48 h assumed)", "{cls}：{tier} 档解冻，时间未知（按 48 h 计）"),
    _p("{cls}: {tier} restore, {took} to {most}, all requested at the start",
       "{cls}：{tier} 档解冻，需 {took} 至 {most}，全部在开始时申请"),
    _p("{cls}: {tier} restore, {took}, all requested at the start", "{cls}：{tier} 档解冻，需 {took}，全部在开始时申请"),
    _p("the network would take {took} ({t_key}), over the {limit} threshold",
       "网络传输需 {took}（{t_key}），超过 {limit} 的阈值"),
    _p("device jobs of {gb} GB, {days} days including shipping; {t_rest}",
       "每个设备任务 {gb} GB，含运输 {days} 天；{t_rest}"),
    _p("assumed size: {size}, the inventory's mix of {objects} objects and {bytes} scaled by {factor}",
       "假设规模：{size}，按清点所得 {objects} 个对象、{bytes} 的构成放大 {factor} 倍"),
    # plan warnings
    _p("{provider} caps egress at {rate} for {size} stored: faster than that the link cannot be used",
       "{provider} 对存储 {size} 的账户限速 {rate}：链路再快也无法超过"),
    _p("restored copies of {cls} are kept {days} days but the transfer takes longer: restore in batches "
       "sized to the link", "{cls} 的解冻副本只保留 {days} 天，而传输耗时更长：请按链路速度分批解冻"),
    _p("the expected transfer takes longer than the program's {days}-day window: egress after it is not "
       "credited", "预计传输时间超过迁出计划的 {days} 天期限：期限后的流量不予返还"),
    # cost lines
    _p("egress tier {n} ({span} per month)", "外网流出流量第 {n} 档（每月 {span}）"),
    _p("egress {hours} ({tz})", "外网流出流量 {hours}（{tz}）"),
    _p("{cls} retrieval ({tier})", "{cls} 数据取回（{tier} 档）"),
    _p("{cls} restore requests ({tier})", "{cls} 解冻请求（{tier} 档）"),
    _p("{cls} retrieval", "{cls} 数据取回"),
    _p("{name} catalogue", "{name} 价目表"),
    # last, being the loosest: a catalogue's device or program and its note
    _p("{t_name}: {t_note}", "{t_name}：{t_note}"),
]

# Why an object is in an exception list: (machine code, English pattern, Chinese). The state
# DB keeps the English; the code goes into the report's tooltip and manifest.
REASONS: list[tuple[str, re.Pattern[str], str]] = [(code, *_p(en, zh)) for code, en, zh in (
    ("truncated", "truncated: pixel data declares {declared} bytes, object holds {held}",
     "文件被截断：像素数据声明 {declared} 字节，对象只有 {held} 字节"),
    ("conflict", ("conflict: SOP Instance UID also at {other} with different content; both kept, this one "
                  "quarantined"), "冲突：另一对象有相同的 SOP Instance UID 而内容不同（见提示）；两者均保留，本对象已隔离"),
    ("conflict", "conflict: SOP Instance UID also at {other} (not migrated yet: {state}); quarantined",
     "冲突：另一对象有相同的 SOP Instance UID（尚未迁移，见提示）；已隔离"),
    ("not_dicom", "downloaded file is not usable DICOM: {detail}", "下载的文件不是可用的 DICOM"),
    ("uids_missing", "Study or Series Instance UID missing", "缺少 Study 或 Series Instance UID"),
    ("connection_lost", "connection lost", "连接中断"),
    ("deleted", "deleted at the source", "已在源端删除"),
    ("deleted", "deleted at the source since inventory", "清点后已在源端删除"),
    ("deleted", "deleted at the source (inventory round {n})", "已在源端删除（第 {n} 轮清点发现）"),
    ("changing", "the object keeps changing at the source", "对象在源端不断变化"),
    ("changed", "changed at the source during the migration (HTTP 412)", "迁移过程中源端发生变化（HTTP 412）"),
    ("stale", "the cloud copy changed after it was copied (ETag {old} -> {new})", "复制后云端对象被修改（ETag 已变化）"),
    ("changed", "changed at the source {n} time(s) during the migration; now {t_state}: {detail}",
     "迁移过程中源端变化 {n} 次；当前状态：{t_state}"),
    ("changed", "changed at the source {n} time(s) during the migration; now {t_state}",
     "迁移过程中源端变化 {n} 次；当前状态：{t_state}"),
    ("not_migrated", "not queued for every destination", "未排入全部目标位置"),
    ("internal", "internal error: {detail}", "内部错误"),
)]

# A reason no pattern knows: a label by the transfer's state; the English stays in the tooltip.
STATE_REASON = {
    "failed": "失败（详情见提示）", "quarantined": "已隔离（详情见提示）", "conflict": "冲突（详情见提示）",
    "missing": "源端缺失（详情见提示）", "skipped": "按设置跳过", "duplicate": "重复（内容一致）",
}


def _fill(chinese: str, found: re.Match[str], lang: str) -> str:
    fields = {k: (phrase(v, lang) or v) if k.startswith("t_") else v for k, v in found.groupdict().items()}
    return chinese.format(**fields)


def phrase(text: str | None, lang: str) -> str | None:
    """`text` in `lang`: English as it is; Chinese from the glossary, or None if it has no entry."""
    if text is None:
        return None
    if lang == "en":
        return text
    if text in PHRASES:
        return PHRASES[text]
    for rx, chinese in PATTERNS:
        found = rx.match(text)
        if found:
            return _fill(chinese, found, lang)
    return None


def reason(text: str | None, state: str | None = None, lang: str = "en") -> tuple[str, str]:
    """(machine code, words in `lang`) for a transfer's recorded reason."""
    text = text or ""
    for code, rx, chinese in REASONS:
        found = rx.match(text)
        if found:
            return code, text if lang == "en" else _fill(chinese, found, lang)
    code = state or "other"
    if lang == "en":
        return code, text or "-"
    return code, STATE_REASON.get(code, "其他原因（详情见提示）")


def say(lang: str) -> Callable[[str | None], str]:
    """A translator that never fails: the glossary's words, else the text as it came."""
    return lambda text: "-" if text is None else (phrase(text, lang) or text)


# The plan document's own words (headings and columns); its figures and items come from the model.
PLAN_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Leaving {title}: cost and time",
        "headline": "{title} ({provider}, {region}): {size} in {objects} objects in the bucket, start {start}",
        "headline.dicom": "{instances} DICOM instances in {studies} studies",
        "headline.zips": "{zipped}, one ranged GET each",
        "headline.encoded": "{encoded} stored compressed by the PACS decode to {decoded} in the archive",
        "assumed": "ASSUMPTION: sized as {size}, not as the bucket inventoried ({real_size} in {real_objects} objects); every figure "
                   "below scales the inventory's mix of objects, classes and sizes to that size.",
        "scenario": "scenario", "time": "time (expected, range)", "finish": "finish (expected)",
        "cost": "cost {currency} (expected, range)", "incomplete": "incomplete",
        "not_available": "not available: {reason}", "unknown": "unknown",
        "chart": "Data moved over calendar time", "chart_log": "Data moved over time since the start "
        "(logarithmic time axis: short and long scenarios both show)",
        "warning": "warning", "warnings": "Warnings", "assumptions": "Assumptions",
        "unverified": "Prices not confirmed in a primary source", "none": "none",
        "read": "read {on}", "unknown_prices": "unknown, prices counted as 0: {names}",
        "item": "item", "quantity": "quantity", "unit_price": "unit price", "total": "total",
        "credit": "exit program credit", "doc": "cloudexit plan: {title}",
    },
    "zh": {
        "title": "迁出{title}：费用与时间",
        "headline": "{title}（{provider}，{region}）：{size}，存储桶中 {objects} 个对象，开始于 {start}",
        "headline.dicom": "{studies} 个检查中的 {instances} 个 DICOM 实例",
        "headline.zips": "{zipped}，每个文件一次范围 GET",
        "headline.encoded": "PACS 压缩存储的 {encoded} 在归档中解压为 {decoded}",
        "assumed": "假设：按 {size} 估算，而非清点所得的存储桶实际规模（{real_size}，{real_objects} 个对象）；以下所有数字均按清点所得的对象、"
                   "存储类型和大小构成放大到该规模。",
        "scenario": "方案", "time": "时间（预计，范围）", "finish": "完成时间（预计）",
        "cost": "费用 {currency}（预计，范围）", "incomplete": "不完整",
        "not_available": "不可用：{reason}", "unknown": "未知",
        "chart": "随日历时间迁出的数据量", "chart_log": "自开始起迁出的数据量（时间轴为对数刻度，长短方案均可见）",
        "warning": "注意", "warnings": "注意事项", "assumptions": "假设条件",
        "unverified": "未经一手来源确认的价格", "none": "无",
        "read": "读取于 {on}", "unknown_prices": "未知价格，按 0 计算：{names}",
        "item": "项目", "quantity": "数量", "unit_price": "单价", "total": "合计",
        "credit": "迁出计划返还", "doc": "cloudexit 迁移计划：{title}",
    },
}


# Zipped studies, as status, plan and audit all say them: the files recorded inside the zips, and
# the zip archives in the bucket (among its objects), with those that could not be unpacked
# (unreadable, hostile, or in an archive storage class at inventory time) said apart.
ZIP_TEXT: dict[str, dict[str, str]] = {
    "en": {"files": "{files} files inside {zips} zip archives", "not_unpacked": " ({bad} could not be unpacked)"},
    "zh": {"files": "{zips} 个 ZIP 压缩包中的 {files} 个文件", "not_unpacked": "（{bad} 个压缩包无法解包）"},
}


def zipped_words(lang: str, files: int, zips: int, not_unpacked: int) -> str:
    """"F files inside M zip archives (K could not be unpacked)" in `lang`."""
    words = ZIP_TEXT[lang]
    return (words["files"].format(files=f"{files:,}", zips=f"{zips:,}")
            + (words["not_unpacked"].format(bad=f"{not_unpacked:,}") if not_unpacked else ""))


def plan_texts(lang: str) -> dict[str, str]:
    if lang not in PLAN_TEXT:
        raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGS)}")
    return PLAN_TEXT[lang]
