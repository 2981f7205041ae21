"""Job records and result images on disk: ``<data-dir>/jobs/<id>/job.json`` and ``result-<k>.png``.

Every file is written atomically (a temporary file in the same folder, flushed, then renamed over
the target), so a crash leaves either the old or the new file, never half of one. Only the event
loop's single I/O thread writes (see `jobs.JobManager`), so writes of one job never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from krita_plugin.collage_diffusion import wire

log = logging.getLogger(__name__)

RECORD = "job.json"
RECORD_FORMAT = 1
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def new_job_id() -> str:
    return uuid.uuid4().hex


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class StoredJob:
    status: wire.JobStatus
    bytes: int  # everything in the job's folder


class JobStore:
    """The jobs folder. Ids are checked against `JOB_ID`, so no name from a request reaches a path."""

    def __init__(self, data_dir: Path, durable: bool = True):
        self.root = Path(data_dir) / "jobs"
        self.durable = durable

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def result_path(self, job_id: str, index: int) -> Path:
        return self.job_dir(job_id) / f"result-{int(index)}.png"

    def result_layer_path(self, job_id: str, index: int, layer: int) -> Path:
        return self.job_dir(job_id) / f"result-{int(index)}-layer-{int(layer)}.png"

    def save(self, status: wire.JobStatus) -> None:
        folder = self.job_dir(status.id)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"format": RECORD_FORMAT, **status.to_dict()}
        record["queue_position"] = None  # only meaningful live
        atomic_write(folder / RECORD, json.dumps(record, indent=1).encode("utf-8"), self.durable)

    def write_result(self, job_id: str, index: int, png: bytes) -> Path:
        path = self.result_path(job_id, index)
        atomic_write(path, png, self.durable)
        return path

    def write_result_layer(self, job_id: str, index: int, layer: int, png: bytes) -> Path:
        path = self.result_layer_path(job_id, index, layer)
        atomic_write(path, png, self.durable)
        return path

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def folder_bytes(self, job_id: str) -> int:
        total = 0
        try:
            for entry in os.scandir(self.job_dir(job_id)):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        return total

    def load_all(self) -> list[StoredJob]:
        """Every readable record, oldest first. Folders without a readable record are removed
        (a crash between creating the folder and writing its record), as are stray temp files."""
        self.prepare()
        jobs = []
        for folder in self.root.iterdir():
            if not folder.is_dir() or not JOB_ID.match(folder.name):
                continue
            for stray in folder.glob(".*.tmp-*"):
                stray.unlink(missing_ok=True)
            try:
                data = json.loads((folder / RECORD).read_text("utf-8"))
                data.pop("format", None)
                status = wire.JobStatus.from_dict(data)
                if status.id != folder.name or status.state not in wire.STATES:
                    raise ValueError("record does not match its folder")
            except (OSError, ValueError, TypeError) as error:
                log.warning("removing job folder %s: unreadable record (%s)", folder.name, error)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            jobs.append(StoredJob(status, self.folder_bytes(status.id)))
        jobs.sort(key=lambda j: j.status.created)
        return jobs


def select_for_cleanup(jobs: list[StoredJob], now: float, keep_seconds: float, keep_bytes: int) -> list[str]:
    """Ids of finished jobs to remove: those finished more than `keep_seconds` ago, then the
    oldest others until all jobs together take at most `keep_bytes`. Unfinished jobs stay."""
    finished = sorted(
        (j for j in jobs if j.status.state in wire.FINISHED_STATES),
        key=lambda j: j.status.finished or j.status.created,
    )
    remove = [j for j in finished if now - (j.status.finished or j.status.created) > keep_seconds]
    removed = {j.status.id for j in remove}
    total = sum(j.bytes for j in jobs if j.status.id not in removed)
    for j in finished:
        if total <= keep_bytes:
            break
        if j.status.id not in removed:
            remove.append(j)
            removed.add(j.status.id)
            total -= j.bytes
    return [j.status.id for j in remove]


def now() -> float:
    return time.time()
