"""Talking to the bridge without ever blocking Krita: Qt's network classes, answers as signals.

Every request returns a `Call` at once; its `finished` signal fires from Qt's event loop. The dock
only connects to signals. Scripts and tests, which have no running event loop (kritarunner),
call ``call.wait()``, which runs the loop until the answer is in: the same code either way.

`JobFollower` follows one job to its end over the long-poll events route (``/jobs/{id}/events``),
reconnecting with back-off when the connection drops (the bridge keeps every event, so nothing is
lost), then fetches the result PNGs. Every failure ends up as one sentence in plain words
(`messages.py`).
"""

from __future__ import annotations

import json

from . import messages, qt, wire

#: How long the long poll asks the bridge to wait for the next event, seconds.
POLL_WAIT_S = 15.0
#: Back-off between reconnect attempts while following a job, seconds.
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
#: A job is given up after this long without reaching the bridge, seconds.
GIVE_UP_S = 300.0

_ERR = qt.QNetworkReply.NetworkError
_ERROR_KINDS = {
    "refused": ("ConnectionRefusedError",),
    "host_not_found": ("HostNotFoundError",),
    "timeout": ("TimeoutError", "ProxyTimeoutError"),
    "closed": ("RemoteHostClosedError",),
    "ssl": ("SslHandshakeFailedError",),
    "unreachable": ("NetworkSessionFailedError", "TemporaryNetworkFailureError", "UnknownNetworkError"),
    "cancelled": ("OperationCanceledError",),
}


def network_error_kind(code) -> str:
    """The `messages.NETWORK_ERRORS` key of a QNetworkReply error code."""
    for kind, names in _ERROR_KINDS.items():
        for name in names:
            if hasattr(_ERR, name) and code == getattr(_ERR, name):
                return kind
    return "other"


def normalize_url(url: str) -> str:
    """``localhost:7870`` → ``http://localhost:7870``; no trailing slash."""
    url = (url or "").strip() or f"http://{wire.DEFAULT_HOST}:{wire.DEFAULT_PORT}"
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class Call(qt.QObject):
    """One HTTP exchange. After `finished`: `ok`, `status` (0: no answer), `body`, `error`."""

    finished = qt.pyqtSignal(object)

    def __init__(self, reply, url: str, timeout_s: float, parent=None):
        super().__init__(parent)
        self.url = url
        self.reply = reply
        self.done = False
        self.ok = False
        self.status = 0
        self.body = b""
        self.headers: dict[str, str] = {}
        self.error = ""
        self.error_kind = ""
        self._timed_out = False
        self._timer = qt.QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._on_timeout)
        self._timer.start(int(timeout_s * 1000))
        reply.finished.connect(self._on_finished)

    def _on_timeout(self) -> None:
        if not self.done:
            self._timed_out = True
            self.reply.abort()

    def _on_finished(self) -> None:
        if self.done:
            return
        self._timer.stop()
        reply = self.reply
        status = reply.attribute(qt.QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        self.status = int(status) if status is not None else 0
        self.body = bytes(reply.readAll())
        self.headers = {
            bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in reply.rawHeaderPairs()
        }
        code = reply.error()
        if self._timed_out:
            self.error_kind = "timeout"
            self.error = messages.network_error_text("timeout", self.url)
        elif self.status == 0:
            self.error_kind = network_error_kind(code)
            self.error = messages.network_error_text(self.error_kind, self.url, reply.errorString())
        elif not 200 <= self.status < 300:
            self.error_kind = "http"
            self.error = messages.http_error_text(self.status, self.body, self.url)
        else:
            self.ok = True
        self.done = True
        reply.deleteLater()
        self.finished.emit(self)
        self.deleteLater()  # the Python attributes (ok, status, body, error) stay readable

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def abort(self) -> None:
        if not self.done:
            self.reply.abort()

    def wait(self, timeout_s: float = 60.0) -> Call:
        """Run Qt's event loop until the answer is in (scripts and tests; never the UI)."""
        qt.spin(lambda: self.done, int(timeout_s * 1000))
        return self

    def then(self, callback) -> Call:
        """Call `callback(self)` once finished (now, if it already is)."""
        if self.done:
            callback(self)
        else:
            self.finished.connect(callback)
        return self


class BridgeClient(qt.QObject):
    """The bridge's HTTP API. Each method returns a `Call`."""

    def __init__(self, url: str = "", token: str = "", parent=None):
        super().__init__(parent)
        self.url = normalize_url(url)
        self.token = token.strip()
        self.nam = qt.QNetworkAccessManager(self)

    def configure(self, url: str, token: str) -> None:
        self.url, self.token = normalize_url(url), token.strip()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        query: dict | None = None,
        timeout_s: float = 30.0,
    ) -> Call:
        url = qt.QUrl(self.url + path)
        if query:
            q = qt.QUrlQuery()
            for key, value in query.items():
                q.addQueryItem(key, str(value))
            url.setQuery(q)
        request = qt.QNetworkRequest(url)
        if self.token:
            request.setRawHeader(qt.qbytes(wire.AUTH_HEADER), qt.qbytes(f"{wire.AUTH_SCHEME} {self.token}"))
        if body is not None:
            request.setHeader(qt.QNetworkRequest.KnownHeaders.ContentTypeHeader, "application/json")
        if method == "GET":
            reply = self.nam.get(request)
        elif method == "DELETE":
            reply = self.nam.deleteResource(request)
        else:
            reply = self.nam.sendCustomRequest(request, qt.qbytes(method), qt.qbytes(body or b""))
        call = Call(reply, self.url, timeout_s, self)
        call.client = self  # a client made for one call stays alive until the answer is in
        return call

    def health(self, timeout_s: float = 5.0) -> Call:
        return self.request("GET", wire.ROUTE_HEALTH, timeout_s=timeout_s)

    def info(self, timeout_s: float = 10.0) -> Call:
        return self.request("GET", wire.ROUTE_INFO, timeout_s=timeout_s)

    def submit(self, request: wire.JobRequest, timeout_s: float = 120.0) -> Call:
        return self.request("POST", wire.ROUTE_JOBS, request.to_json().encode("utf-8"), timeout_s=timeout_s)

    def job(self, job_id: str) -> Call:
        return self.request("GET", wire.route(wire.ROUTE_JOB, job_id=job_id))

    def events(self, job_id: str, after: int, wait_s: float = POLL_WAIT_S) -> Call:
        path = wire.route(wire.ROUTE_JOB_EVENTS, job_id=job_id)
        return self.request("GET", path, query={"after": after, "timeout": wait_s}, timeout_s=wait_s + 15.0)

    def cancel(self, job_id: str) -> Call:
        return self.request("POST", wire.route(wire.ROUTE_JOB_CANCEL, job_id=job_id), b"{}")

    def get(self, path: str, timeout_s: float = 60.0) -> Call:
        return self.request("GET", path, timeout_s=timeout_s)


class JobFollower(qt.QObject):
    """Follows one job: progress events, reconnects, then the result PNGs.

    Signals: `progress(ProgressEvent)`, `retrying(str)` (connection trouble, still trying),
    `succeeded(JobStatus, list[(ResultInfo, png bytes)])`, `failed(str)` (plain words; also for a
    cancelled job, with ``cancelled`` True). Exactly one of succeeded/failed fires.
    """

    progress = qt.pyqtSignal(object)
    retrying = qt.pyqtSignal(str)
    succeeded = qt.pyqtSignal(object, object)
    failed = qt.pyqtSignal(str)

    def __init__(self, client: BridgeClient, job_id: str, layer_names: list[str] | None = None, parent=None):
        super().__init__(parent)
        self.client = client
        self.job_id = job_id
        self.layer_names = layer_names or []
        self.after = 0
        self.finished = False
        self.cancelled = False
        self.error = ""
        self.status: wire.JobStatus | None = None
        self.results: list[tuple[wire.ResultInfo, bytes]] = []
        # Per result index, its layer stack's (layer info, PNG), bottom to top (output "layers").
        self.stacks: dict[int, list[tuple[wire.ResultLayerInfo, bytes]]] = {}
        self.last_event: wire.ProgressEvent | None = None
        self._call: Call | None = None
        self._failures = 0
        self._trouble = qt.QElapsedTimer()
        self._stopped = False

    def start(self) -> None:
        self._poll()

    def stop(self) -> None:
        """Stop following (the job goes on at the bridge)."""
        self._stopped = True
        if self._call is not None:
            self._call.abort()

    def cancel(self) -> Call:
        """Ask the bridge to cancel; following goes on until the bridge says it stopped."""
        return self.client.cancel(self.job_id)

    def wait(self, timeout_s: float = 120.0) -> bool:
        """Run the event loop until the job has finished here (scripts and tests)."""
        return qt.spin(lambda: self.finished, int(timeout_s * 1000))

    # -- the loop --------------------------------------------------------------------------------

    def _poll(self) -> None:
        if self._stopped:
            return
        self._call = self.client.events(self.job_id, self.after).then(self._on_events)

    def _trouble_or_fail(self, call: Call) -> bool:
        """True when the loop should go on retrying after `call` failed."""
        transient = call.status == 0 or call.status in (502, 503, 504)
        if not transient:
            return False
        if self._failures == 0:
            self._trouble.start()
        self._failures += 1
        if self._trouble.elapsed() / 1000.0 > GIVE_UP_S:
            return False
        delay = BACKOFF_S[min(self._failures - 1, len(BACKOFF_S) - 1)]
        self.retrying.emit(f"{call.error} Retrying in {delay:g} s…")
        qt.QTimer.singleShot(int(delay * 1000), self._poll)
        return True

    def _on_events(self, call: Call) -> None:
        if self._stopped:
            return
        if not call.ok:
            if call.status == 404:
                self._fail(
                    "The bridge no longer knows this job (it was restarted with another data folder,"
                    " or the job was removed)."
                )
            elif not self._trouble_or_fail(call):
                self._fail(call.error)
            return
        self._failures = 0
        try:
            response = wire.EventsResponse.from_dict(call.json())
        except (TypeError, ValueError, AttributeError) as error:
            self._fail(
                f"The bridge sent an answer the plugin cannot read ({error}). Are both the same version?"
            )
            return
        for event in response.events:
            self.after = max(self.after, event.seq)
            self.last_event = event
            self.progress.emit(event)
        self.after = max(self.after, response.last_seq)
        if response.done:
            self.client.job(self.job_id).then(self._on_status)
        else:
            self._poll()

    def _on_status(self, call: Call) -> None:
        if not call.ok:
            if not self._trouble_or_fail(call):
                self._fail(call.error)
            return
        self.status = wire.JobStatus.from_dict(call.json())
        if self.status.state != wire.DONE:
            self.cancelled = self.status.state == wire.CANCELLED
            self._fail(messages.job_failed_text(self.status, self.layer_names))
            return
        self._fetch_next()

    def _fetch_next(self) -> None:
        assert self.status is not None
        if len(self.results) == len(self.status.results):
            self.finished = True
            self.succeeded.emit(self.status, list(self.results))
            return
        info = self.status.results[len(self.results)]
        self.client.get(info.url).then(lambda call, info=info: self._on_result(call, info))

    def _on_result(self, call: Call, info: wire.ResultInfo) -> None:
        if not call.ok:
            self._fail(f"Could not fetch result {info.index + 1}: {call.error}")
            return
        self.results.append((info, call.body))
        self._fetch_layers(info, [])

    def _fetch_layers(self, info: wire.ResultInfo, got: list) -> None:
        """The stack layers of `info` one by one, then the next result."""
        if len(got) == len(info.layers):
            if got:
                self.stacks[info.index] = got
            self._fetch_next()
            return
        layer = info.layers[len(got)]

        def fetched(call: Call) -> None:
            if not call.ok:
                self._fail(f"Could not fetch layer {layer.name!r} of result {info.index + 1}: {call.error}")
                return
            got.append((layer, call.body))
            self._fetch_layers(info, got)

        self.client.get(layer.url).then(fetched)

    def _fail(self, message: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.error = message
        self.failed.emit(message)
