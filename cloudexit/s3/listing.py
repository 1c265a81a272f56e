"""The inventory's listing: a bucket listed in parallel over groups of folders, planned from the
bucket's own common prefixes.

An explore task lists one level with a delimiter; `_plan_tasks` turns the folders it found into
more explore tasks (few folders, shallow) or groups of consecutive folders, each listed flat by
one worker. Workers hand pages to the inventory's writer thread through `_pages`; the plan and
the resume points live in the `list_tasks` table (written by `Inventory`, cloudexit/inventory.py).
"""

from __future__ import annotations

import datetime as dt
import math
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cloudexit.core.config import InventoryConfig
from cloudexit.core.paths import folder_dates
from cloudexit.s3.source import ListedObject

if TYPE_CHECKING:
    from cloudexit.s3.lean import LeanS3

MAX_CHAR = "\U0010ffff"
EXPLORE_DEPTH = 4  # levels of common prefixes explored before grouping folders
CPS_PER_TASK = 64  # with fewer folders than this at a level, explore each of them further
GROUPS_PER_WORKER = 4  # an explore page's folders are split into list_workers * this groups


@dataclass
class ListingTask:
    id: int
    prefix: str
    explore: bool
    start_after: str | None = None  # group: just past the folder before its first one
    last_folder: str | None = None  # group: its last folder (stored in `end_before`)
    last_key: str | None = None  # resume point


@dataclass
class ListingPage:
    task: ListingTask
    objects: list[ListedObject]
    prefixes: list[str]
    last_key: str | None
    done: bool
    before: str | None = None  # explore: a StartAfter just before this page's first folder


class Listing:
    """The listing side of `Inventory`: the worker threads' part and the planning of tasks."""

    config: InventoryConfig
    since: dt.date | None
    round: int
    _lean: LeanS3 | None
    _pages: queue.Queue[ListingPage | BaseException]
    _stop: threading.Event

    # -- listing (worker threads) ---------------------------------------------------------
    def _list_task(self, task: ListingTask) -> None:
        try:
            if task.explore:
                self._explore(task)
            else:
                self._list_group(task)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread to raise
            self._pages.put(exc)

    def _put(self, page: ListingPage) -> None:
        while not self._stop.is_set():
            try:
                self._pages.put(page, timeout=0.2)
                return
            except queue.Full:
                continue

    def _list_group(self, task: ListingTask) -> None:
        """A flat listing of consecutive folders of one parent, from just past the folder before
        the first one to the end of the last one.

        Both bounds are folders the server returned, so this holds in S3's key order and in the
        folder-walk order of filer-backed stores alike (a folder's keys are contiguous in both).
        Keys directly in the parent are skipped: the parent's explore page recorded them.
        """
        assert self._lean is not None and task.last_folder is not None
        cut, last_folder, last_key = len(task.prefix), task.last_folder, task.last_key
        in_last = last_key is not None and last_key.startswith(last_folder)
        start, token = last_key or task.start_after, None
        while not self._stop.is_set():
            page = self._lean.page(task.prefix, start_after=start, token=token)
            keep, done = [], not page.truncated
            for o in page.objects:
                if "/" not in o.key[cut:]:
                    continue
                if o.key.startswith(last_folder):
                    in_last = True
                elif in_last:
                    done = True  # past the group's last folder
                    break
                keep.append(o)
            if keep:
                last_key = keep[-1].key
            self._put(ListingPage(task, keep, [], last_key, done))
            if done:
                return
            token = page.next_token

    def _explore(self, task: ListingTask) -> None:
        assert self._lean is not None
        last_key, token = task.last_key, None
        before = last_key  # every folder of the next page lies past it, in any listing order
        while not self._stop.is_set():
            page = self._lean.page(task.prefix, start_after=last_key, token=token, delimiter="/")
            # Resume point: past the last key, and past everything under the last folder.
            marks = [o.key for o in page.objects] + [p + MAX_CHAR for p in page.prefixes]
            last = max(marks) if marks else last_key
            self._put(ListingPage(task, page.objects, page.prefixes, last, not page.truncated, before))
            if not page.truncated:
                return
            before = page.prefixes[-1] + MAX_CHAR if page.prefixes else last
            last_key, token = last, page.next_token

    # -- planning (the writer thread) ---------------------------------------------------
    def _plan_tasks(self, page: ListingPage) -> list[tuple[int, str, str | None, str | None, int, int, int]]:
        """Turn the folders an explore page found into listing tasks (rows of `list_tasks`).

        Few folders at a shallow level: each is explored further. Otherwise runs of consecutive
        folders become groups, each listed flat by one worker. With --since, a folder whose date
        lies wholly before that day is recorded as skipped (done, never listed), and splits
        the run around it.
        """
        task, rnd = page.task, self.round
        depth = task.prefix.count("/")
        skip = [self._skipped(cp) for cp in page.prefixes]
        if depth + 1 < EXPLORE_DEPTH and page.done and len(page.prefixes) < CPS_PER_TASK:
            return [(rnd, cp, None, None, 1, int(s), int(s)) for cp, s in zip(page.prefixes, skip)]
        size = max(1, math.ceil(len(page.prefixes) / (self.config.list_workers * GROUPS_PER_WORKER)))
        planned, before = [], page.before
        run: list[str] = []

        def close_run() -> None:
            for i in range(0, len(run), size):
                start = before if i == 0 else run[i - 1] + MAX_CHAR
                planned.append((rnd, task.prefix, start, run[i:i + size][-1], 0, 0, 0))

        for cp, skipped in zip(page.prefixes, skip):
            if skipped:
                close_run()
                planned.append((rnd, cp, None, None, 0, 1, 1))
                before, run = cp + MAX_CHAR, []
            else:
                run.append(cp)
        close_run()
        return planned

    def _skipped(self, folder: str) -> bool:
        if self.since is None:
            return False
        dates = folder_dates(folder)
        return dates is not None and dates[1] <= self.since
