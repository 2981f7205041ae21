"""The dock's "Result as" choice (plugin side, no Krita): stored with the document, sent as `output`."""

import json

from krita_plugin.collage_diffusion import wire
from krita_plugin.collage_diffusion.collage import LayerRecord, build_request
from krita_plugin.collage_diffusion.settings import OUTPUTS, DocumentSettings


def test_output_is_a_document_setting_read_leniently():
    assert DocumentSettings().output == "image"
    assert set(OUTPUTS) == set(wire.OUTPUTS)
    stored = DocumentSettings(output="layers").to_json()
    assert DocumentSettings.from_json(stored).output == "layers"
    data = json.loads(stored)
    for bad in ("stack", 3, None):
        data["output"] = bad
        assert DocumentSettings.from_dict(data).output == "image"
    # A document file's collage.json says nothing about how results arrive.
    assert DocumentSettings.from_file_settings({"output": "layers"}).output == "image"


def test_the_request_carries_the_choice():
    png = wire.encode_png(16, 16, bytes((200, 40, 40, 255)) * (16 * 16))
    records = [
        LayerRecord(uid="{a}", name="a cat", kind="paintlayer", doc_box=(8, 8, 16, 16), png=png, x=8, y=8)
    ]
    for output in OUTPUTS:
        plan, problems = build_request(records, DocumentSettings(output=output), {}, (64, 64), (64, 64))
        assert problems == [] and plan.request.output == output
        assert plan.request.validate() == []
        assert json.loads(plan.request.to_json())["output"] == output
