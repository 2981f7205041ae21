"""The dock's state and actions, without widgets: connection, the running job, the last results.

The dock (UI) and the Krita tests drive the same object: actions return at once and report
through signals; tests wait with ``model.wait_idle()`` (which runs Qt's event loop).
"""

from __future__ import annotations

import contextlib
import random

from . import choices, collage, document, messages, preview_layer, qt, results, results_stack, wire
from .client import BridgeClient, Call, JobFollower
from .history import History, ResultEntry, ResultSet

# Connection states.
UNKNOWN, CONNECTING, CONNECTED, DISCONNECTED, REFUSED = (
    "unknown",
    "connecting",
    "connected",
    "disconnected",
    "refused",
)

#: Seconds between health checks: while connected, and while not (reconnecting).
CHECK_CONNECTED_S = 20.0
CHECK_DISCONNECTED_S = 3.0


class CollageModel(qt.QObject):
    """Signals:

    - ``connection_changed(state, text)``: a connection state above and a sentence for the dock
    - ``busy_changed(bool)``: a job is being prepared, run or written
    - ``progress(text, fraction)`` and ``preview(png)`` while a job runs
    - ``results_changed()``: new results were written (see `results_for`)
    - ``error(text)``: something failed; plain words, shown in the dock
    - ``notice(text)``: information ("3 layers sent", "connection lost, retrying…")
    - ``info_changed()``: /info lists other models or LoRAs than before (or none: not connected)
    """

    connection_changed = qt.pyqtSignal(str, str)
    busy_changed = qt.pyqtSignal(bool)
    progress = qt.pyqtSignal(str, float)
    preview = qt.pyqtSignal(bytes)
    results_changed = qt.pyqtSignal()
    error = qt.pyqtSignal(str)
    notice = qt.pyqtSignal(str)
    info_changed = qt.pyqtSignal()

    def __init__(self, url: str = "", token: str = "", parent=None):
        super().__init__(parent)
        self.client = BridgeClient(url, token, self)
        self.state = UNKNOWN
        self.state_text = ""
        self.info: wire.InfoResponse | None = None
        self.busy = False
        self.follower: JobFollower | None = None
        self.job_id = ""
        self.last_error = ""
        self.last_written: list = []  # nodes written by the last job (tests look at them)
        self.history = History()  # this session's recent jobs per document
        self._checking: Call | None = None
        self._monitor = qt.QTimer(self)
        self._monitor.setSingleShot(True)
        self._monitor.timeout.connect(self.check_connection)
        self._pending_doc = None
        self._plan: collage.Plan | None = None
        self._cancel_requested = False
        self._preview: preview_layer.PreviewLayer | None = None  # the job's preview on the canvas
        self.show_preview_layer = True  # scripts may turn the canvas preview off

    # -- connection --------------------------------------------------------------------------------

    def configure(self, url: str, token: str) -> None:
        """New address or token: check the connection again now."""
        self.client.configure(url, token)
        self._set_info(None)
        self.state = UNKNOWN
        self._checking = None  # an answer from the old address is ignored (see _on_info)
        self.check_connection()

    def start_monitor(self) -> None:
        """Check the connection now and then (reconnecting by itself after the bridge was down)."""
        self.check_connection()

    def stop_monitor(self) -> None:
        self._monitor.stop()

    def check_connection(self) -> Call:
        if self._checking is not None and not self._checking.done:
            return self._checking
        if self.state == UNKNOWN:  # while down, the last error stays shown between attempts
            self._set_state(CONNECTING, f"Connecting to {self.client.url}…")
        self._checking = self.client.info().then(self._on_info)
        return self._checking

    def _on_info(self, call: Call) -> None:
        if call.url != self.client.url:
            return
        if call.ok:
            try:
                self._set_info(wire.InfoResponse.from_dict(call.json()))
            except (TypeError, ValueError):
                self._set_info(None)
            if self.info is not None and self.info.api_version != wire.API_VERSION:
                self._set_state(
                    REFUSED,
                    f"The bridge speaks API version {self.info.api_version}, this plugin {wire.API_VERSION}:"
                    " update the plugin or the bridge so both are the same version.",
                )
            else:
                self._set_state(CONNECTED, self._connected_text())
        elif call.status in (401, 403):
            self._set_state(REFUSED, call.error)
        else:
            self._set_state(DISCONNECTED, f"{call.error} (trying again every {CHECK_DISCONNECTED_S:g} s)")
        delay = CHECK_CONNECTED_S if self.state == CONNECTED else CHECK_DISCONNECTED_S
        self._monitor.start(int(delay * 1000))

    def _set_info(self, info: wire.InfoResponse | None) -> None:
        """Keep the bridge's /info; tell the dock when what it offers (models, LoRAs) changed."""
        before = _offer(self.info)
        self.info = info
        if _offer(info) != before:
            self.info_changed.emit()

    def _connected_text(self) -> str:
        if self.info is None:
            return f"Connected to {self.client.url}"
        where = self.info.device if self.info.device != "auto" else "loaded on first job"
        queue = f", {self.info.queue_length} waiting" if self.info.queue_length else ""
        return f"Connected: model {self.info.model} ({where}){queue}"

    def _set_state(self, state: str, text: str) -> None:
        changed = (state, text) != (self.state, self.state_text)
        self.state, self.state_text = state, text
        if changed:
            self.connection_changed.emit(state, text)

    # -- generating --------------------------------------------------------------------------------

    def generate(self, doc, kind: str = "generate", active_uid: str | None = None) -> bool:
        """Start a job for `doc`: "generate" (one image, the seed of the settings), "variants"
        (the variant count, from a new random seed) or "regenerate" (the document's selection,
        when it has one, else the layer `active_uid`, default Krita's active layer, redone on
        the last result). False when it did not start
        (the reason went out through `error`)."""
        if self.busy:
            return self._refuse("A generation is already running: wait for it or press Cancel.")
        if doc is None:
            return self._refuse("Open a document first.")
        settings = document.load_settings(doc)
        model, loras, problems = choices.request_choices(settings, self.info)
        if problems:
            return self._refuse("\n".join(problems))
        controlnet, controlnet_problems = choices.controlnet_choice(settings, self.info)
        limits = wire.Limits.from_dict(self.info.limits) if self.info is not None else None
        details = choices.chosen_details(self.info, settings.model)  # "auto" follows the chosen model
        size = collage.generation_size(doc.width(), doc.height(), settings.size_policy, limits, details)
        try:
            records, stats = document.read_layers(doc, size, settings.results_group)
        except Exception as error:  # a Krita API surprise must not take the dock down
            return self._refuse(f"Could not read the document's layers: {error}")
        listed = document.list_layers(doc, settings.results_group)
        layer_settings = settings.resolve([(n.uid, n.name) for n in listed])
        seed, variants, base, mask = settings.seed, 1, None, None
        if kind == "variants":
            seed, variants = random.randrange(2**31), settings.variants
        elif kind == "regenerate":
            seed = random.randrange(2**31)
            mask = document.read_selection_png(doc, size)  # a selection wins over the active layer
            if mask is None and active_uid is None:
                active_uid = document.active_layer_uid(doc)
            base = self._regenerate_base(doc, size, settings.results_group)
        plan, problems = collage.build_request(
            records,
            settings,
            layer_settings,
            size,
            (doc.width(), doc.height()),
            kind=kind,
            seed=seed,
            variants=variants,
            base_png=base,
            regenerate_uid=active_uid,
            model=model,
            loras=loras,
            regenerate_mask=mask,
            controlnet=controlnet,
            controlnet_problems=controlnet_problems,
            ip_adapter_missing=choices.ip_adapter_missing(self.info, settings.model),
        )
        if plan is None:
            return self._refuse("\n".join(problems))
        settings.update_layers(layer_settings)
        document.save_settings(doc, settings)
        self._pending_doc = doc
        self._plan = plan
        preview_layer.remove_stale(doc, settings.results_group)
        self._preview = (
            preview_layer.PreviewLayer(doc, settings.results_group) if self.show_preview_layer else None
        )
        self._cancel_requested = False
        self.last_error = ""
        self._set_busy(True)
        what = {
            "generate": "Generating",
            "variants": f"Generating {variants} variants",
            "regenerate": "Regenerating",
        }
        self.progress.emit("sending…", 0.0)
        details = "".join(f"\n• {line}" for line in [*stats.skipped, *plan.notes])
        self.notice.emit(f"{what[kind]}: {len(plan.uids)} layers at {size[0]}×{size[1]}.{details}")
        self.client.submit(plan.request).then(self._on_submitted)
        return True

    def _regenerate_base(self, doc, size, results_uid: str) -> bytes | None:
        """The last result (the picked variant) at generation size; after a reopen, the topmost
        visible layer of the results group."""
        last = self.history.current(document.document_key(doc))
        if last is not None and last.base_png is not None and wire.png_size(last.base_png) == tuple(size):
            entry = last.entries[last.picked]
            node = document.node_by_uid(doc, entry.node_uid)
            if node is not None and node.visible():
                return last.base_png
        node = results.top_visible_result(doc, results_uid)
        if node is None:
            return None
        return document.read_canvas_png(node, (doc.width(), doc.height()), size)

    def _on_submitted(self, call: Call) -> None:
        plan = self._plan
        names = [layer.name for layer in plan.request.layers] if plan else []
        if not call.ok:
            text = call.error
            if call.status in (400, 422):
                text = messages.http_error_text(call.status, call.body, "", names)
            if call.status == 0:
                self._set_state(DISCONNECTED, call.error)
                self._monitor.start(int(CHECK_DISCONNECTED_S * 1000))
            self._finish(text)
            return
        self._set_state(CONNECTED, self._connected_text())
        status = wire.JobStatus.from_dict(call.json())
        self.job_id = status.id
        follower = JobFollower(self.client, status.id, names, self)
        follower.progress.connect(self._on_progress)
        follower.retrying.connect(self.notice)
        follower.succeeded.connect(self._on_succeeded)
        follower.failed.connect(self._on_failed)
        self.follower = follower
        self.progress.emit(messages.progress_text(None, status.state), 0.0)
        follower.start()
        if self._cancel_requested:
            self.cancel()

    def _on_progress(self, event: wire.ProgressEvent) -> None:
        self.progress.emit(messages.progress_text(event), messages.progress_fraction(event))
        if event.preview:
            if self._preview is not None:
                try:
                    self._preview.show(bytes(event.preview))
                except Exception:  # a preview is a nicety: never fail the job for it
                    self._preview = None
            self.preview.emit(bytes(event.preview))

    def _on_succeeded(self, status: wire.JobStatus, fetched: list) -> None:
        doc, plan = self._pending_doc, self._plan
        stacks = self.follower.stacks if self.follower is not None else {}
        self._remove_preview(keep_group=True)  # the results go in its place
        try:
            self._write(doc, plan, fetched, stacks)
        except Exception as error:
            self._finish(f"The results arrived but could not be written into the document: {error}")
            return
        self.progress.emit("done", 1.0)
        self._finish("")
        self.results_changed.emit()

    def _write(self, doc, plan: collage.Plan, fetched: list, stacks: dict | None = None) -> None:
        settings = document.load_settings(doc)
        regenerated = plan.regenerate_name if plan.kind == "regenerate" else None
        named = [
            (png, collage.result_layer_name(plan.request.prompt, info.seed, regenerated))
            for info, png in fetched
        ]
        if stacks:  # output "layers": a group per result
            size = (plan.request.width, plan.request.height)
            stacked = [
                (png, name, stacks.get(info.index, []))
                for (png, name), (info, _) in zip(named, fetched, strict=True)
            ]
            group, nodes = results_stack.write_stack_results(doc, stacked, size, settings.results_group)
        else:
            group, nodes = results.write_results(doc, named, settings.results_group)
        self.last_written = nodes
        settings.results_group = document.uid_of(group)
        document.save_settings(doc, settings)
        entries = [
            ResultEntry(seed=info.seed, png=png, name=name, node_uid=document.uid_of(node))
            for (info, png), (_, name), node in zip(fetched, named, nodes, strict=True)
        ]
        self.history.add(ResultSet(document.document_key(doc), plan, entries))

    def _on_failed(self, message: str) -> None:
        cancelled = self.follower is not None and self.follower.cancelled
        self.progress.emit("cancelled" if cancelled else "failed", 0.0)
        self._finish("" if cancelled else message, notice="Cancelled." if cancelled else "")

    def _refuse(self, message: str) -> bool:
        self.last_error = message
        self.error.emit(message)
        return False

    def _remove_preview(self, keep_group: bool = False) -> None:
        preview, self._preview = self._preview, None
        if preview is not None:
            with contextlib.suppress(RuntimeError):  # the document was closed meanwhile
                preview.remove(keep_group)

    def _finish(self, error: str, notice: str = "") -> None:
        self._remove_preview()
        self.follower = None
        self._pending_doc = None
        self._set_busy(False)
        if error:
            self._refuse(error)
        if notice:
            self.notice.emit(notice)

    def _set_busy(self, busy: bool) -> None:
        if busy != self.busy:
            self.busy = busy
            self.busy_changed.emit(busy)

    def cancel(self) -> None:
        """Ask the bridge to stop the running job; its state comes back through the follower."""
        if not self.busy:
            return
        self.progress.emit("cancelling…", 0.0)
        if self.follower is None:  # still being sent: cancelled as soon as the bridge has it
            self._cancel_requested = True
            return

        def answered(call: Call) -> None:
            if not call.ok and call.status != 409:  # 409: it had finished already
                self.error.emit(f"Could not cancel: {call.error}")

        self.follower.cancel().then(answered)

    def wait_idle(self, timeout_s: float = 120.0) -> bool:
        """Run the event loop until no job is running (scripts and tests)."""
        return qt.spin(lambda: not self.busy, int(timeout_s * 1000))

    # -- results -------------------------------------------------------------------------------------

    def results_for(self, doc) -> ResultSet | None:
        """The current job's results: the last job's, or the job whose result was picked last."""
        return self.history.current(document.document_key(doc)) if doc is not None else None

    def jobs_for(self, doc) -> list[ResultSet]:
        """This session's recent jobs of `doc` (at most `history.MAX_JOBS`), oldest first."""
        return self.history.jobs(document.document_key(doc)) if doc is not None else []

    def pick(self, doc, index: int, job: int | None = None) -> int | None:
        """Show result `index` of job `job` (an index into `jobs_for`; default the current job) and
        hide the other layers of the results group; its seed, or None."""
        if doc is None:
            return None
        key = document.document_key(doc)
        jobs = self.history.jobs(key)
        if job is None:
            current = self.history.current(key)
            job = next((j for j, r in enumerate(jobs) if r is current), -1)
        entry = self.history.select(key, job, index)
        if entry is None:
            return None
        settings = document.load_settings(doc)
        group = results.find_results_group(doc, settings.results_group)
        if group is not None:
            siblings = [
                document.uid_of(n) for n in group.childNodes() if n.name() != preview_layer.PREVIEW_NAME
            ]
            results.show_only(group, entry.node_uid, siblings)
            doc.refreshProjection()
        return entry.seed

    def discard(self, doc, node_uid: str) -> bool:
        """Remove a result layer (or layer-stack group) this plugin wrote in this session, if it is
        still in the results group; anything else is refused (False, the reason through `error`)."""
        if doc is None:
            return self._refuse("Open a document first.")
        key = document.document_key(doc)
        if self.history.find(key, node_uid) is None:
            return self._refuse("Only a result this dock made in this session can be discarded.")
        settings = document.load_settings(doc)
        group = results.find_results_group(doc, settings.results_group)
        node = (
            next((n for n in group.childNodes() if document.uid_of(n) == node_uid), None) if group else None
        )
        if node is None:  # deleted or moved out of "Collage results" by the user: theirs now
            self.history.forget(key, node_uid)
            self.results_changed.emit()
            return self._refuse(
                "That result is no longer in the 'Collage results' group; nothing was removed."
            )
        name = node.name()
        node.remove()
        self.history.forget(key, node_uid)
        doc.refreshProjection()
        self.notice.emit(f"Discarded '{name}'.")
        self.results_changed.emit()
        return True


def _offer(info: wire.InfoResponse | None) -> tuple | None:
    """What of /info the dock's model and LoRA lists show (queue lengths and the like left out)."""
    if info is None:
        return None
    return (
        info.model,
        tuple(info.models),
        tuple(repr(d) for d in info.model_details),
        tuple(repr(e) for e in (*info.checkpoints, *info.loras)),
    )
