"""The dock's results history (krita_plugin/collage_diffusion/history.py): plain Python."""

from __future__ import annotations

import pytest

from krita_plugin.collage_diffusion.history import History, ResultEntry, ResultSet


def job(doc: str, *uids: str) -> ResultSet:
    return ResultSet(
        doc, None, [ResultEntry(seed=i, png=b"", name=u, node_uid=u) for i, u in enumerate(uids)]
    )


def test_recent_jobs_per_document_newest_current_oldest_dropped():
    history = History(max_jobs=2)
    history.add(job("d", "a"))
    history.add(job("other", "x"))
    history.add(job("d", "b1", "b2"))
    history.add(job("d", "c"))
    assert [[e.node_uid for e in j.entries] for j in history.jobs("d")] == [["b1", "b2"], ["c"]]
    assert history.current("d").entries[0].node_uid == "c"
    assert history.find("d", "a") is None  # forgotten with its job: no longer the plugin's to discard
    assert history.find("other", "x") == (0, 0)
    assert history.current("none") is None and history.jobs("none") == []


def test_select_makes_an_older_job_current():
    history = History()
    history.add(job("d", "a1", "a2"))
    history.add(job("d", "b"))
    assert history.select("d", 0, 1).node_uid == "a2"
    assert history.current("d").picked == 1 and history.current("d").base_png == b""
    assert history.current("d").entries[0].node_uid == "a1"
    assert history.select("d", 2, 0) is None and history.select("d", 0, 2) is None


def test_forget_keeps_current_and_picked_pointing_at_the_same_results():
    history = History()
    history.add(job("d", "a"))
    history.add(job("d", "b1", "b2", "b3"))
    history.select("d", 1, 2)
    assert history.forget("d", "b1").node_uid == "b1"
    assert history.current("d").entries[history.current("d").picked].node_uid == "b3"
    assert history.forget("d", "b3") is not None  # the picked one: the one before it is picked
    assert history.current("d").entries[history.current("d").picked].node_uid == "b2"
    history.select("d", 1, 0)
    history.forget("d", "a")  # an older job emptied: it goes, the current job stays current
    assert [j.entries[0].node_uid for j in history.jobs("d")] == ["b2"]
    assert history.current("d").entries[0].node_uid == "b2"
    assert history.forget("d", "user layer") is None
    history.forget("d", "b2")
    assert history.jobs("d") == [] and history.current("d") is None


def test_max_jobs_must_be_positive():
    with pytest.raises(ValueError, match="max_jobs"):
        History(max_jobs=0)
