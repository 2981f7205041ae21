"""What the dock tells the user, in plain words: bridge errors, progress. Standard library only."""

from __future__ import annotations

import json

from . import wire

#: Network failures, by the kind the client reports (see `client.network_error_kind`).
NETWORK_ERRORS = {
    "refused": "Cannot reach the bridge at {url}: nothing is listening there. Start the bridge"
    " (or press “Start local bridge”), or check the address and port.",
    "host_not_found": "Cannot reach the bridge: the host in {url} is unknown. Check the address.",
    "timeout": "The bridge at {url} did not answer in time. It may be busy or stuck; check its window or log.",
    "closed": "The bridge at {url} closed the connection. It may have stopped or restarted.",
    "ssl": "Secure connection to {url} failed: {detail}.",
    "unreachable": "Cannot reach the bridge at {url}: the network says it is unreachable ({detail}).",
    "cancelled": "The request to {url} was stopped.",
    "other": "Cannot talk to the bridge at {url}: {detail}.",
}


def network_error_text(kind: str, url: str, detail: str = "") -> str:
    template = NETWORK_ERRORS.get(kind, NETWORK_ERRORS["other"])
    return template.format(url=url, detail=(detail or "unknown error").rstrip("."))


def http_error_text(
    status: int, body: bytes | str | None, url: str = "", layer_names: list[str] | None = None
) -> str:
    """A bridge's error answer (`wire.ErrorResponse` JSON, or anything else) in plain words."""
    message, problems = "", []
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        message = str(data.get("error") or "")
        problems = [str(p) for p in data.get("problems") or []]
    elif body:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        message = " ".join(text.split())[:200]
    problems = [name_layers(p, layer_names) for p in problems]
    listed = "".join(f"\n• {p}" for p in problems)
    where = f" at {url}" if url else ""
    if status == 401:
        return (
            f"The bridge{where} refused the token: enter the token it was started with"
            f" (its --token or COLLAGE_BRIDGE_TOKEN) in the dock's Token field."
        )
    if status == 403:
        return f"The bridge{where} refused the request: {message or 'forbidden'}."
    if status == 413:
        return f"The collage is too big for the bridge: {message or 'request too large'}. Use a smaller size policy or fewer layers."
    if status in (400, 422):
        head = "The bridge cannot run this collage" if problems else "The bridge refused the request"
        return f"{head}: {message or 'invalid request'}.{listed}" if not problems else f"{head}:{listed}"
    if status == 404:
        return f"The bridge{where} does not know this: {message or 'not found'}."
    if status == 409:
        return f"The bridge{where}: {message or 'conflict'}."
    if status == 503:
        return "The bridge is busy (its queue is full). Try again in a moment."
    if status >= 500:
        return f"The bridge{where} failed: {message or f'HTTP {status}'}. Its log has the details.{listed}"
    return f"The bridge{where} answered HTTP {status}: {message or 'unexpected answer'}.{listed}"


def job_failed_text(status: wire.JobStatus, layer_names: list[str] | None = None) -> str:
    if status.state == wire.CANCELLED:
        return "Cancelled."
    problems = [name_layers(p, layer_names) for p in status.problems]
    listed = "".join(f"\n• {p}" for p in problems)
    return f"Generation failed: {status.error or 'unknown error'}.{listed}"


def name_layers(problem: str, layer_names: list[str] | None) -> str:
    """``layers[2].strength: …`` → ``layer 'cat' strength: …`` when the names are known."""
    if not layer_names or not problem.startswith("layers["):
        return problem
    index, _, rest = problem[len("layers[") :].partition("]")
    if not index.isdigit() or int(index) >= len(layer_names):
        return problem
    rest = rest[1:] if rest.startswith(".") else rest
    return f"layer '{layer_names[int(index)]}' {rest}".replace(" :", ":")


def progress_text(event: wire.ProgressEvent | wire.ProgressInfo | None, state: str = "") -> str:
    """The progress bar's text: "sampling 12/30", "learning appearance of 'cat'… 40/100",
    with "variant 2 of 4" when several are made one after another."""
    if event is None:
        return {wire.QUEUED: "waiting in the bridge's queue…", wire.RUNNING: "starting…"}.get(state, state)
    kind = getattr(event, "kind", wire.EVENT_PROGRESS)
    if kind == wire.EVENT_STATE:
        return {
            wire.QUEUED: "waiting in the bridge's queue…",
            wire.RUNNING: "starting…",
            wire.DONE: "done",
            wire.FAILED: "failed",
            wire.CANCELLED: "cancelled",
        }.get(event.state, event.state)
    phase = event.phase or "working"
    if phase.startswith("learning") and not phase.endswith("…"):
        phase += "…"
    text = f"{phase} {event.step}/{event.total}" if event.total > 1 else phase
    if event.variants > 1:
        text += f" · variants {event.variants_done}/{event.variants} done"
    return text


def progress_fraction(event: wire.ProgressEvent | wire.ProgressInfo | None) -> float:
    """0..1 for the progress bar (sampling dominates; other phases show their own steps)."""
    if event is None or getattr(event, "kind", wire.EVENT_PROGRESS) != wire.EVENT_PROGRESS:
        return 0.0
    within = event.step / event.total if event.total else 0.0
    variants = max(1, event.variants)
    return (
        min(1.0, (event.variants_done + within) / variants) if event.phase == "sampling" else min(1.0, within)
    )
