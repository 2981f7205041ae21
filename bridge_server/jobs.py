"""The job queue, the single GPU worker, and the in-memory view of the job store.

Threads: the event loop owns every `Job` and all state changes. `generate` runs on one dedicated
thread (`gpu`), so jobs run one at a time in submission order and the loop never blocks; its
progress reports are handed back with `loop.call_soon_threadsafe`. Record and image files are
written on one more thread (`io`), in order. Cancel is a `threading.Event` per job, which
`core.generate` checks before every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from core.collage import CollageError
from core.generate import GenerationResult
from core.progress import GenerationCancelled, Progress
from krita_plugin.collage_diffusion import wire

from .catalog import ModelCatalog
from .config import BridgeConfig
from .convert import (
    Converted,
    RequestProblems,
    embedding_files,
    ip_adapter_problems,
    library_choices,
    parse_request,
    to_collage,
)
from .engine import Engine, KeepLoras, RunJob, RunRequest
from .images import preview_png
from .results import save_results
from .storage import JobStore, StoredJob, new_job_id, select_for_cleanup

log = logging.getLogger(__name__)

INTERRUPTED_RESTART = "interrupted: the bridge restarted before the job finished"
INTERRUPTED_STOP = "interrupted: the bridge was stopped before the job finished"


@dataclass(eq=False)
class Job:
    status: wire.JobStatus
    converted: Converted | None = None  # dropped once the job has run
    cancel: threading.Event = field(default_factory=threading.Event)
    events: list[wire.ProgressEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    delete_when_done: bool = False
    deleted: bool = False
    # Written by the GPU thread, read by the loop (single values: atomic under the GIL).
    current: tuple[str, int, int] = ("", 0, 0)
    cancelled_at: tuple[str, int, int] | None = None
    last_preview: float = 0.0

    @property
    def id(self) -> str:
        return self.status.id

    @property
    def finished(self) -> bool:
        return self.status.state in wire.FINISHED_STATES


class QueueFull(Exception):
    pass


def _variants_of(p: Progress) -> tuple[int, int]:
    """(variants finished, variants asked for) of a report; 0 of 1 when core does not say."""
    pair = getattr(p, "variants", None)
    try:
        done, asked = pair  # type: ignore[misc]
        return int(done), int(asked)
    except (TypeError, ValueError):
        return 0, 1


class JobManager:
    def __init__(self, config: BridgeConfig, run_job: RunJob | None = None, engine: Engine | None = None):
        self.config = config
        self.catalog = ModelCatalog(config)
        self.engine = engine or Engine(
            config.device,
            config.engine_options,
            self.catalog.resolve,
            config.lora_cache_bytes,
            keep_loras=KeepLoras(max(config.loaded_loras, 0), max(config.loaded_lora_bytes, 0)),
            ip_adapter=self.catalog.ip_adapter,
        )
        self.run_job: RunJob = run_job or self.engine.run
        self.store = JobStore(config.data_dir)
        self.jobs: dict[str, Job] = {}  # in creation order
        self.queue: deque[str] = deque()
        self.running: Job | None = None
        self.queued_bytes = 0
        self._gpu = ThreadPoolExecutor(1, thread_name_prefix="collage-gpu")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="collage-io")
        self._encode = ThreadPoolExecutor(4, thread_name_prefix="collage-png")  # variants at once
        self._decode = asyncio.Semaphore(2)  # requests decoded at once (bounds memory)
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._cleaner: asyncio.Task | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        stored = await self._in_io(self.store.load_all)
        for item in stored:
            job = Job(item.status)
            self.jobs[job.id] = job
            if item.status.state in (wire.QUEUED, wire.RUNNING):
                log.warning("job %s was %s when the bridge stopped: marked failed", job.id, item.status.state)
                self._finish(job, wire.FAILED, INTERRUPTED_RESTART)
                self._save(job)
            else:
                job.events.append(self._terminal_event(job, item.status.last_seq or 1))
        await self.cleanup()
        self._worker = asyncio.create_task(self._work(), name="collage-worker")
        self._cleaner = asyncio.create_task(self._clean_periodically(), name="collage-cleanup")
        if self.config.preload:
            await self._loop.run_in_executor(self._gpu, self.engine.load, self.config.model)

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop taking work: waiting jobs are marked failed, the running one is cancelled."""
        self._stopping = True
        for job_id in list(self.queue):
            job = self.jobs[job_id]
            self._finish(job, wire.FAILED, INTERRUPTED_STOP)
            self._save(job)
        self.queue.clear()
        if self.running is not None:
            self.running.cancel.set()
        if self._cleaner:
            self._cleaner.cancel()
        released = True
        if self._worker:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            except asyncio.TimeoutError:
                log.error("the running job did not stop within %.0f s; leaving it", timeout)
                self._worker.cancel()
                released = False  # the GPU thread is still busy with it
        if released:  # the LoRAs left loaded go: core's model may outlive this bridge (tests)
            try:
                await asyncio.get_running_loop().run_in_executor(self._gpu, self.engine.release_loras)
            except Exception:
                log.exception("could not remove the LoRAs left loaded in the model")
        self._gpu.shutdown(wait=False, cancel_futures=True)
        await self._in_io(lambda: None)  # the last records are on disk
        self._io.shutdown(wait=True)
        self._encode.shutdown(wait=True)

    def pause(self) -> None:
        """Start no further job until `resume` (the running one goes on). For tests and maintenance."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    # -- submitting --------------------------------------------------------------------------

    async def decode(self, body: bytes) -> Converted:
        """Parse, validate and decode a request body off the loop. Raises `RequestProblems`."""
        async with self._decode:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._decode_sync, body)

    def _decode_sync(self, body: bytes) -> Converted:
        request = parse_request(body, self.config, self.catalog)
        converted = to_collage(request, self.config)
        library_choices(request, converted, self.catalog, self.engine)
        ip_adapter_problems(request, converted, self.catalog, self.engine)
        converted.embeddings = embedding_files(
            request, self.catalog, lambda: self.catalog.details(converted.model, self.engine).family
        )
        return converted

    async def submit(self, converted: Converted) -> Job:
        if self._stopping:
            raise QueueFull("the bridge is shutting down")
        if len(self.queue) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} jobs waiting); try again later")
        if self.queue and self.queued_bytes + converted.nbytes > self.config.max_queued_bytes:
            raise QueueFull(
                "the waiting jobs hold as many layer pixels as the bridge allows; try again later"
            )
        c = converted.collage
        status = wire.JobStatus(
            id=new_job_id(),
            state=wire.QUEUED,
            created=time.time(),
            model=converted.model,
            prompt=c.prompt,
            width=c.width,
            height=c.height,
            layers=len(c.layers),
            variants=converted.variants,
            steps=c.steps,
        )
        job = Job(status, converted)
        self.jobs[job.id] = job
        self.queue.append(job.id)
        self.queued_bytes += converted.nbytes
        self._publish(job, wire.EVENT_STATE)
        self._save(job)
        self._wake.set()
        await self._in_io(lambda: None)  # the record is on disk before the client hears of the job
        log.info(
            "job %s queued: %s×%s, %d layers, %d variants",
            job.id,
            c.width,
            c.height,
            len(c.layers),
            converted.variants,
        )
        return job

    # -- queries and commands ------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        return None if job is None or job.deleted else job

    def status(self, job: Job) -> wire.JobStatus:
        s = job.status
        if s.state == wire.QUEUED:
            with contextlib.suppress(ValueError):
                s.queue_position = self.queue.index(job.id) + (1 if self.running else 0)
        else:
            s.queue_position = None
        return s

    def list(self) -> list[Job]:
        return [j for j in reversed(self.jobs.values()) if not j.deleted]

    def cancel(self, job: Job) -> None:
        if job.finished:
            return
        if job.status.state == wire.QUEUED:
            self._dequeue(job)
            self._finish(job, wire.CANCELLED, "cancelled before it started")
            self._save(job)
        elif not job.cancel.is_set():
            job.cancelled_at = job.current
            job.cancel.set()

    async def delete(self, job: Job) -> bool:
        """Remove the job and its files. A running job is cancelled and removed when it stops
        (returns False then)."""
        if job.status.state == wire.RUNNING:
            job.delete_when_done = True
            self.cancel(job)
            return False
        self.cancel(job)
        await self._forget(job)
        return True

    async def wait_events(self, job: Job, after: int, timeout: float | None) -> list[wire.ProgressEvent]:
        """Events with ``seq > after``; waits up to `timeout` seconds for one if there is none
        yet and the job is not finished (None: wait as long as it takes)."""
        while True:
            changed = job.changed
            events = [e for e in job.events if e.seq > after]
            if events or job.finished or timeout == 0:
                return events
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except asyncio.TimeoutError:
                return []

    async def cleanup(self) -> list[str]:
        """Remove finished jobs by age and total size (config.keep_seconds, keep_bytes)."""
        jobs = [j for j in self.jobs.values() if not j.deleted]
        sizes = await self._in_io(lambda: [self.store.folder_bytes(j.id) for j in jobs])
        stored = [StoredJob(j.status, size) for j, size in zip(jobs, sizes, strict=True)]
        ids = select_for_cleanup(stored, time.time(), self.config.keep_seconds, self.config.keep_bytes)
        for job_id in ids:
            await self._forget(self.jobs[job_id])
        if ids:
            log.info("cleanup removed %d finished jobs", len(ids))
        return ids

    async def refresh_models(self) -> None:
        """List the model folders off the event loop (new headers may have to be read)."""
        await asyncio.get_running_loop().run_in_executor(None, self.catalog.refresh)

    def info(self) -> dict:
        loaded, device, dtype = self.engine.describe(self.config.model)
        names = self.catalog.names()
        return {
            "models": names,
            "model_details": [self.catalog.details(name, self.engine) for name in names],
            "library": self.catalog.listing(),
            "model_loaded": loaded,
            "device": device,
            "dtype": dtype,
            "queue_length": len(self.queue),
            "running": self.running.id if self.running else None,
        }

    # -- the worker ------------------------------------------------------------------------------

    async def _work(self) -> None:
        while not self._stopping:
            if not self.queue or self._paused:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self.jobs[self.queue.popleft()]
            self.queued_bytes -= job.converted.nbytes if job.converted else 0
            self.running = job
            try:
                await self._run(job)
            except Exception:  # never let one job stop the worker
                log.exception("job %s: unexpected error in the worker", job.id)
            finally:
                self.running = None

    async def _run(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        job.status.state = wire.RUNNING
        job.status.started = time.time()
        job.status.timings["queued"] = round(job.status.started - job.status.created, 4)
        self._publish(job, wire.EVENT_STATE)
        self._save(job)
        converted = job.converted
        assert converted is not None
        request = RunRequest.of(
            converted, self._progress_reporter(job, loop), job.cancel, self.config.max_batch
        )
        state, message, problems = wire.DONE, "", []
        try:
            t0 = time.perf_counter()
            result = await loop.run_in_executor(self._gpu, self.run_job, request)
            job.status.timings["compute"] = round(time.perf_counter() - t0, 4)
            if getattr(result, "stacks", None):  # output "layers": the fill's share of "compute"
                job.status.timings["fill"] = round(result.fill_seconds, 4)
            t1 = time.perf_counter()
            job.status.results = await self._in_io(self._save_results, job, result)
            job.status.timings["save"] = round(time.perf_counter() - t1, 4)
            job.status.warnings = list(result.warnings)
        except GenerationCancelled:
            state, message = wire.CANCELLED, self._cancel_message(job)
            if self._stopping and not job.delete_when_done:
                state, message = wire.FAILED, INTERRUPTED_STOP
        except CollageError as error:
            state, message, problems = wire.FAILED, "the collage cannot be generated", error.problems
        except RequestProblems as error:
            state, message, problems = wire.FAILED, error.message, error.problems
        except Exception as error:
            log.exception("job %s failed", job.id)
            state, message = (
                wire.FAILED,
                f"{type(error).__name__}: {error}" if str(error) else type(error).__name__,
            )
        finally:
            job.converted = None  # free the pixels
        self._finish(job, state, message, problems)
        log.info(
            "job %s %s%s (%s)",
            job.id,
            state,
            f": {message}" if message else "",
            ", ".join(f"{k} {v:.2f} s" for k, v in job.status.timings.items()),
        )
        if job.delete_when_done:
            await self._forget(job)
        else:
            self._save(job)

    def _progress_reporter(self, job: Job, loop: asyncio.AbstractEventLoop) -> Callable[[Progress], None]:
        interval = self.config.preview_interval

        def report(p: Progress) -> None:  # on the GPU thread
            job.current = (p.phase, p.step, p.total)
            preview = None
            now = time.monotonic()
            if p.preview is not None and now - job.last_preview >= interval:
                job.last_preview = now
                preview = preview_png(p.preview, self.config.preview_size)
            done, asked = _variants_of(p)
            info = wire.ProgressInfo(p.phase, int(p.step), int(p.total), done, asked)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens any more
                loop.call_soon_threadsafe(self._on_progress, job, info, preview)

        return report

    def _on_progress(self, job: Job, info: wire.ProgressInfo, preview: bytes | None) -> None:
        if job.finished:
            return
        job.status.progress = info
        if preview is not None:  # keep only the newest preview in memory
            for old in job.events:
                old.preview = None
        self._publish(
            job,
            wire.EVENT_PROGRESS,
            phase=info.phase,
            step=info.step,
            total=info.total,
            variants_done=info.variants_done,
            variants=info.variants,
            preview=preview,
        )

    def _save_results(self, job: Job, result: GenerationResult) -> list[wire.ResultInfo]:
        return save_results(self.store, self._encode, job.id, result, self.config.png_level)

    @staticmethod
    def _cancel_message(job: Job) -> str:
        if job.cancelled_at and job.cancelled_at[0]:
            phase, step, total = job.cancelled_at
            return f"cancelled during {phase}, after step {step} of {total}"
        return "cancelled"

    # -- internals -----------------------------------------------------------------------------

    def _publish(self, job: Job, kind: str, **fields: object) -> wire.ProgressEvent:
        seq = job.status.last_seq + 1
        event = wire.ProgressEvent(
            seq=seq, job_id=job.id, kind=kind, state=job.status.state, time=time.time(), **fields
        )
        job.status.last_seq = seq
        job.events.append(event)
        job.changed.set()
        job.changed = asyncio.Event()
        return event

    def _finish(self, job: Job, state: str, message: str = "", problems: list[str] | None = None) -> None:
        job.status.state = state
        job.status.finished = time.time()
        job.status.error = None if state == wire.DONE else (message or state)
        job.status.problems = list(problems or [])
        if state == wire.DONE:
            job.status.progress = None
        self._publish(job, wire.EVENT_STATE, message=message)
        # A finished job keeps its recent events for late readers, without the pixels.
        for event in job.events:
            event.preview = None
        del job.events[: -self.config.max_events_kept]

    def _terminal_event(self, job: Job, seq: int) -> wire.ProgressEvent:
        s = job.status
        return wire.ProgressEvent(
            seq=seq,
            job_id=s.id,
            kind=wire.EVENT_STATE,
            state=s.state,
            time=s.finished or s.created,
            message=s.error or "",
        )

    def _dequeue(self, job: Job) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(job.id)
            self.queued_bytes -= job.converted.nbytes if job.converted else 0
        job.converted = None

    async def _forget(self, job: Job) -> None:
        job.deleted = True
        self.jobs.pop(job.id, None)
        await self._in_io(self.store.delete, job.id)

    def _save(self, job: Job) -> None:
        """Queue a snapshot of the record for writing (in order, on the I/O thread)."""
        snapshot = wire.JobStatus.from_dict(job.status.to_dict())
        self._io.submit(self._save_sync, snapshot)

    def _save_sync(self, status: wire.JobStatus) -> None:
        if status.id not in self.jobs or self.jobs[status.id].deleted:
            return  # deleted meanwhile: do not bring its folder back
        try:
            self.store.save(status)
        except OSError:
            log.exception("job %s: cannot write its record", status.id)

    async def _in_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _clean_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.cleanup_interval)
            try:
                await self.cleanup()
            except Exception:
                log.exception("cleanup failed")
