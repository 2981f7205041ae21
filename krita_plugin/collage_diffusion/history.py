"""The recent jobs' results of each open document, as the dock's thumbnails show them: which result
layers (or layer-stack groups) the plugin made, which one is shown (the base of a regenerate),
and what a discard may remove. Pure Python: the layers themselves are `results.py`'s.

Only layers recorded here count as the plugin's own: `discard` never removes anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Jobs kept per document (their thumbnails and the right to discard their layers).
MAX_JOBS = 8


@dataclass
class ResultEntry:
    seed: int
    png: bytes
    name: str
    node_uid: str


@dataclass
class ResultSet:
    """The results of one finished job of one document."""

    doc_key: str
    plan: object  # collage.Plan (not imported: this module stays free of the request code)
    entries: list[ResultEntry] = field(default_factory=list)
    picked: int = 0

    @property
    def base_png(self) -> bytes | None:
        return self.entries[self.picked].png if self.entries else None


class History:
    """Per document (by `document.document_key`): its last `max_jobs` jobs, oldest first, and the
    current one (the newest, or the one whose result was picked last)."""

    def __init__(self, max_jobs: int = MAX_JOBS):
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs}")
        self.max_jobs = max_jobs
        self._jobs: dict[str, list[ResultSet]] = {}
        self._current: dict[str, int] = {}

    def add(self, job: ResultSet) -> None:
        """A finished job: it becomes the current one; the oldest beyond `max_jobs` is forgotten."""
        jobs = self._jobs.setdefault(job.doc_key, [])
        jobs.append(job)
        del jobs[: max(0, len(jobs) - self.max_jobs)]
        self._current[job.doc_key] = len(jobs) - 1

    def jobs(self, doc_key: str) -> list[ResultSet]:
        return list(self._jobs.get(doc_key, []))

    def current(self, doc_key: str) -> ResultSet | None:
        jobs = self._jobs.get(doc_key)
        return jobs[self._current[doc_key]] if jobs else None

    def select(self, doc_key: str, job: int, index: int) -> ResultEntry | None:
        """Make entry `index` of job `job` (an index into `jobs`) the shown one; None if absent."""
        jobs = self._jobs.get(doc_key, [])
        if not 0 <= job < len(jobs) or not 0 <= index < len(jobs[job].entries):
            return None
        self._current[doc_key] = job
        jobs[job].picked = index
        return jobs[job].entries[index]

    def find(self, doc_key: str, node_uid: str) -> tuple[int, int] | None:
        """(job, index) of the entry whose layer is `node_uid`, or None: not a layer the plugin made
        (in this session)."""
        for j, job in enumerate(self._jobs.get(doc_key, [])):
            for i, entry in enumerate(job.entries):
                if entry.node_uid == node_uid:
                    return j, i
        return None

    def forget(self, doc_key: str, node_uid: str) -> ResultEntry | None:
        """Drop the entry of layer `node_uid` (a discarded result), and its job when it was the last
        one; the current job and picked variant follow. The entry, or None if it was not recorded."""
        where = self.find(doc_key, node_uid)
        if where is None:
            return None
        j, i = where
        jobs = self._jobs[doc_key]
        entry = jobs[j].entries.pop(i)
        picked = jobs[j].picked - (jobs[j].picked > i)
        jobs[j].picked = min(picked, max(0, len(jobs[j].entries) - 1))
        current = self._current[doc_key]
        if not jobs[j].entries:
            jobs.pop(j)
            if not jobs:
                del self._jobs[doc_key], self._current[doc_key]
                return entry
            current = len(jobs) - 1 if current == j else current - (current > j)
        self._current[doc_key] = current
        return entry
