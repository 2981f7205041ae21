"""In-Krita checks of a job's life and the bridge: cancel, preview, history, errors, the local bridge."""

from __future__ import annotations

import os

from harness import Skip  # beside this module
from suite_common import (
    SIZE,
    assert_eq,
    build_document,
    check,
    fingerprint,
    generate_in_panel,
    make_model,
    paint,
    result_layers,
    set_prompt,
)


@check(needs_bridge=True)
def cancel_stops_and_writes_nothing(report):
    from collage_diffusion import document

    doc = build_document()
    try:
        set_prompt(doc, "a slow one", steps=400)
        before = fingerprint(doc)
        model = make_model()
        seen = []
        model.progress.connect(lambda text, fraction: seen.append(text))
        model.generate(doc, "generate")
        from collage_diffusion import qt

        qt.spin(lambda: any(t.startswith("sampling") for t in seen) or not model.busy, 60000)
        model.cancel()
        model.wait_idle(60)
        assert_eq(model.last_error, "", "cancel is not an error")
        assert_eq(result_layers(doc), [], "no result layer after cancel")
        assert_eq(fingerprint(doc), before, "user layers after cancel")
        sampling = [t for t in seen if t.startswith("sampling")]
        if not sampling or "/400" not in sampling[0]:
            raise AssertionError(f"progress texts: {seen}")
        report["detail"] = f"progress seen: {seen[:2]} … {seen[-2:]}"
        document.find_results_group(doc)
    finally:
        doc.close()


@check(needs_bridge=True)
def preview_layer_during_a_job(report):
    """While a job runs its preview is a temporary layer on top of "Collage results" at the
    document's size; after the job it is gone with the result in its place, and after a cancel it
    is gone with nothing written (not even the results group it made)."""
    from collage_diffusion import collage, document, qt
    from collage_diffusion.preview_layer import PREVIEW_NAME

    doc = build_document()
    try:
        set_prompt(doc, "a slow one", steps=400)
        before = fingerprint(doc)
        model = make_model()
        seen = []  # the results group's layer names at each preview

        def at_preview(_png):
            seen.append([n.name() for n in result_layers(doc)])

        model.preview.connect(at_preview)

        def preview_node():
            layers = result_layers(doc)
            return layers[-1] if layers and layers[-1].name() == PREVIEW_NAME else None

        # Cancelled: the preview shows, then goes with the group it made.
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        qt.spin(lambda: preview_node() is not None or not model.busy, 60000)
        node = preview_node()
        if node is None:
            raise AssertionError(f"no preview layer during the job (previews seen: {seen})")
        bounds = node.bounds()
        assert_eq((bounds.width(), bounds.height()), (SIZE, SIZE), "preview layer scaled to the document")
        assert_eq(node.visible(), True, "preview layer visible")
        model.cancel()
        model.wait_idle(60)
        assert_eq(model.last_error, "", "cancel is not an error")
        assert_eq(document.find_results_group(doc), None, "no results group after a cancelled first job")
        assert_eq(fingerprint(doc), before, "user layers after cancel")
        # Finished: the result in its place.
        set_prompt(doc, "a red sign, a cat and a ball", steps=30, seed=3)
        seen.clear()
        if not model.generate(doc, "generate"):
            raise AssertionError(f"generate did not start: {model.last_error}")
        model.wait_idle(120)
        assert_eq(model.last_error, "", "generate error")
        if not seen or PREVIEW_NAME not in seen[-1]:
            raise AssertionError(f"the preview layer was not in the results group during the job: {seen}")
        want = collage.result_layer_name("a red sign, a cat and a ball", 3)
        assert_eq([n.name() for n in result_layers(doc)], [want], "the result in the preview's place")
        assert_eq(fingerprint(doc), before, "user layers after generate")
        report["detail"] = f"{len(seen)} previews shown during the finished job"
    finally:
        doc.close()


@check(needs_bridge=True)
def results_history_and_discard(report):
    """The dock's thumbnails cover the document's recent jobs (newest first); clicking an older
    one shows its layer and hides the other results; Discard removes only the plugin's layer:
    a user layer moved into "Collage results" is refused and stays, as do all user layers."""
    import fakekrita
    from collage_diffusion import dock, document, qt

    doc = build_document()
    try:
        set_prompt(doc, "a red sign and a cat", steps=4, seed=5)
        settings = document.load_settings(doc)
        settings.variants = 2
        document.save_settings(doc, settings)
        panel = dock.CollagePanel(fakekrita.Host(doc), make_model())
        panel.model.show_preview_layer = False
        generate_in_panel(panel)
        panel.actions_section.variants_button.click()
        panel.model.wait_idle(180)
        assert_eq(panel.model.last_error, "", "variants error")
        jobs = panel.model.jobs_for(doc)
        assert_eq([len(j.entries) for j in jobs], [1, 2], "two jobs in the history")
        thumbs = panel.results_section.thumbs
        seeds = [thumbs.item(r).text() for r in range(thumbs.count())]
        want = [f"seed {e.seed}" for e in jobs[1].entries] + [f"seed {jobs[0].entries[0].seed}"]
        assert_eq(seeds, want, "thumbnails: the variants, then the first job's result")
        # Click the first job's thumbnail: its layer shows, the variants hide.
        panel._on_pick(thumbs.item(2))
        by_uid = {document.uid_of(n): n for n in result_layers(doc)}
        first = jobs[0].entries[0].node_uid
        shown = {uid: node.visible() for uid, node in by_uid.items()}
        assert_eq(shown, {uid: uid == first for uid in by_uid}, "only the clicked result shown")
        assert_eq(panel.options_section.seed.value(), jobs[0].entries[0].seed, "its seed in Seed")
        # A user layer put into the results group is not the plugin's: refused, kept.
        before = fingerprint(doc)
        group = document.find_results_group(doc)
        mine = paint(doc, group, "my sketch", (0, 0, 255, 255), (0, 0, 8, 8))
        if panel.model.discard(doc, document.uid_of(mine)):
            raise AssertionError("discard removed a user layer")
        if document.node_by_uid(doc, document.uid_of(mine)) is None:
            raise AssertionError("the user layer is gone after a refused discard")
        refused = panel.model.last_error
        # Discard the selected (first job's) result through the dock: only that layer goes.
        assert_eq(panel.results_section.selected(), (0, 0), "the clicked thumbnail is selected")
        panel.discard_selected()
        qt.spin(lambda: False, 100)
        left = {document.uid_of(n) for n in result_layers(doc)}
        assert_eq(
            left,
            {e.node_uid for e in jobs[1].entries} | {document.uid_of(mine)},
            "result layers after discard",
        )
        assert_eq(thumbs.count(), 2, "thumbnails after discard")
        assert_eq([len(j.entries) for j in panel.model.jobs_for(doc)], [2], "history after discard")
        assert_eq(fingerprint(doc), before, "user layers after discard")
        # A variant discarded by its uid: the other variant stays.
        second = jobs[1].entries[1].node_uid
        if not panel.model.discard(doc, second):
            raise AssertionError(f"discard of a variant failed: {panel.model.last_error}")
        left = {document.uid_of(n) for n in result_layers(doc)}
        assert_eq(left, {jobs[1].entries[0].node_uid, document.uid_of(mine)}, "after discarding a variant")
        report["detail"] = f"refused: {refused!r}"
        panel.shutdown()
    finally:
        doc.close()


@check()
def bridge_down_gives_a_clear_error(report):
    from collage_diffusion.model import DISCONNECTED, CollageModel

    doc = build_document()
    try:
        set_prompt(doc, "anything")
        before = fingerprint(doc)
        tree = [n.name() for n in doc.rootNode().childNodes()]
        model = CollageModel("http://127.0.0.1:9")  # nothing listens on the discard port
        model.check_connection().wait(10)
        assert_eq(model.state, DISCONNECTED, "state")
        started = model.generate(doc, "generate")
        model.wait_idle(30)
        error = model.last_error
        if "Cannot reach the bridge at http://127.0.0.1:9" not in error or "Start the bridge" not in error:
            raise AssertionError(f"unclear error: {error!r} (started: {started})")
        assert_eq(fingerprint(doc), before, "user layers")
        assert_eq([n.name() for n in doc.rootNode().childNodes()], tree, "layer tree")
        report["detail"] = error
    finally:
        doc.close()


@check(needs_bridge=True)
def bridge_errors_in_plain_words(report):
    """A request the bridge refuses (422) and a wrong token (401) come back as sentences."""
    from collage_diffusion import client, wire

    c = client.BridgeClient(os.environ["COLLAGE_TEST_BRIDGE"])
    layer = wire.LayerSpec(text="x", png=wire.encode_png(8, 8, bytes(8 * 8 * 4)), x=0, y=0, name="ghost")
    call = c.submit(wire.JobRequest(prompt="p", layers=[layer], width=64, height=64, steps=2)).wait(30)
    assert_eq(call.status, 422, "status of a collage with an invisible layer")
    if "cannot run this collage" not in call.error or "no visible pixels" not in call.error:
        raise AssertionError(f"422 text: {call.error!r}")
    info = c.info().wait(10)
    assert_eq(info.ok, True, "info")
    report["detail"] = call.error.replace("\n", " | ")


@check()
def local_bridge_starts_and_stops(report):
    """The dock's "Start local bridge": the environment recorded by install_krita.py."""
    from collage_diffusion import bridge_process, client, qt

    env = bridge_process.load_config()
    if env is None:
        raise Skip("no COLLAGE_BRIDGE_CONFIG")
    port = int(os.environ.get("COLLAGE_TEST_LOCAL_PORT", "0")) or 17870
    bridge = bridge_process.make_local_bridge()
    ready, stopped = [], []
    bridge.ready.connect(ready.append)
    bridge.stopped.connect(stopped.append)
    problem = bridge.start(port, model="demo", env=env)
    assert_eq(problem, "", "start problem")
    qt.spin(lambda: ready or stopped, 90000)
    if not ready:
        raise AssertionError(f"the local bridge did not come up: {stopped} {bridge.lines[-5:]}")
    health = client.BridgeClient(ready[0]).health().wait(10)
    assert_eq(health.ok, True, f"health of {ready[0]}")
    bridge.stop()
    qt.spin(lambda: stopped, 10000)
    assert_eq(stopped, ["The local bridge was stopped."], "stopped")
    report["detail"] = f"up at {ready[0]}"
