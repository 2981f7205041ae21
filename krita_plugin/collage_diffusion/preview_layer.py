"""The running job's latest preview on the canvas: one temporary paint layer at the top of the
"Collage results" group, scaled to the document, rewritten with each preview and removed when
the job ends (before its results are written in its place), is cancelled or fails.

Krita 5's Python API has no signal before a document is saved (`Notifier.imageSaved` comes
after the file is written), so a save during a job keeps the preview layer in the file; it has
a name saying so, and `remove_stale` takes it out when the dock next sees the document.
Nothing here touches a layer other than the preview layer (and a results group it created).
"""

from __future__ import annotations

from . import qt
from .document import find_results_group, uid_of
from .results import add_image_layer, ensure_results_group, image_from_png

#: The preview layer's name: what it is, for a user who finds it in a file saved mid-job.
PREVIEW_NAME = "Collage preview (temporary)"


class PreviewLayer:
    """The preview layer of one job in one document."""

    def __init__(self, doc, results_uid: str = ""):
        self.doc = doc
        self.results_uid = results_uid
        self.node_uid = ""
        self.created_group = False  # the results group was made for the preview: removed with it

    def show(self, png: bytes) -> None:
        """Show `png` (any size; scaled to the document) as the preview layer."""
        image = image_from_png(png)
        node = self._node()
        if node is None:
            self.created_group = find_results_group(self.doc, self.results_uid) is None
            group = ensure_results_group(self.doc, self.results_uid)
            self.results_uid = uid_of(group)
            node = add_image_layer(self.doc, image, PREVIEW_NAME, group)
            self.node_uid = uid_of(node)
        else:
            w, h = self.doc.width(), self.doc.height()
            image = image.scaled(
                w, h, qt.Qt.AspectRatioMode.IgnoreAspectRatio, qt.Qt.TransformationMode.SmoothTransformation
            ).convertToFormat(qt.QImage.Format.Format_ARGB32)
            node.setPixelData(qt.image_bytes(image), 0, 0, w, h)
        self.doc.refreshProjection()

    def remove(self, keep_group: bool = False) -> None:
        """Take the preview layer out (and the results group, when it was made for the preview and
        holds nothing else, unless `keep_group`: results are about to be written into it)."""
        node = self._node()
        if node is None:
            return
        group = find_results_group(self.doc, self.results_uid)
        node.remove()
        self.node_uid = ""
        if self.created_group and not keep_group and group is not None and not group.childNodes():
            group.remove()
        self.created_group = False
        self.doc.refreshProjection()

    def _node(self):
        if not self.node_uid:
            return None
        group = find_results_group(self.doc, self.results_uid)
        for node in group.childNodes() if group is not None else []:
            if uid_of(node) == self.node_uid:
                return node
        return None


def remove_stale(doc, results_uid: str = "") -> int:
    """Remove preview layers left in the results group (a document saved during a job); how many."""
    group = find_results_group(doc, results_uid)
    stale = [n for n in (group.childNodes() if group is not None else []) if n.name() == PREVIEW_NAME]
    for node in stale:
        node.remove()
    if stale:
        doc.refreshProjection()
    return len(stale)
