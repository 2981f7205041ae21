"""The model library (core/model_library.py, core/weight_files.py): ComfyUI, A1111/Forge and plain
folders listed by name, kind and family from headers only, large files without reading them, new
files without a restart; the CLI's and the bridge's --models-dir."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.model_library import ModelLibrary, kind_folders, resolve_model_name
from core.model_sources import ModelLoadError
from core.weight_files import (
    CHECKPOINT,
    CONTROLNET,
    EMBEDDING,
    KINDS,
    LORA,
    WeightNames,
    embedding_family,
    kind_of,
    lora_family,
    read_safetensors_header,
)
from krita_plugin.collage_diffusion import wire

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# --- files written by the project -------------------------------------------------------------
def kohya_lora(path: Path, family: str) -> Path:
    """A kohya/A1111 LoRA's names and shapes (zeros: only they matter for listing). SD 1.x/2.x
    name the U-Net as diffusers does, SDXL with the original module names and a second encoder."""
    width = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    block = "input_blocks_4_1" if family == "sdxl" else "down_blocks_1_attentions_0"
    attn = f"lora_unet_{block}_transformer_blocks_0_attn2_to_k"
    te = "lora_te1_" if family == "sdxl" else "lora_te_"
    q = "text_model_encoder_layers_0_self_attn_q_proj"
    weights = {
        f"{attn}.lora_down.weight": torch.zeros(4, width),
        f"{attn}.lora_up.weight": torch.zeros(640, 4),
        f"{attn}.alpha": torch.tensor(4.0),
        f"{te}{q}.lora_down.weight": torch.zeros(4, 1024 if family == "sd2" else 768),
        f"{te}{q}.lora_up.weight": torch.zeros(768, 4),
    }
    if family == "sdxl":
        weights[f"lora_te2_{q}.lora_down.weight"] = torch.zeros(4, 1280)
    save_file(weights, str(path))
    return path


def peft_lora(path: Path, width: int, second_encoder: bool = False) -> Path:
    """diffusers/PEFT names: `unet.…attn2.to_k.lora_A.weight`, `text_encoder_2.…`."""
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    weights = {f"{attn}.lora_A.weight": torch.zeros(4, width), f"{attn}.lora_B.weight": torch.zeros(640, 4)}
    if second_encoder:
        weights["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(
            4, 1280
        )
    save_file(weights, str(path))
    return path


def a1111_embedding(path: Path, width: int) -> Path:
    """A1111's .pt textual inversion: `string_to_param` {"*": (vectors, width)} plus its notes."""
    data = {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": {"*": torch.zeros(2, width)},
        "name": path.stem,
        "step": 1000,
    }
    torch.save(data, path)
    return path


def safetensors_embedding(path: Path, family: str) -> Path:
    if family == "sdxl":
        save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(path))
    else:
        save_file({"emb_params": torch.zeros(2, 768 if family == "sd1" else 1024)}, str(path))
    return path


def big_checkpoint(path: Path, source: Path, gigabytes: float) -> Path:
    """A sparse file with a valid safetensors header: the names and shapes of `source`'s tensors
    plus one padding tensor, `gigabytes` in all; the data is a hole (truncate), never written."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in read_safetensors_header(source).shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    padding = int(gigabytes * 1024**3) // 2 - offset // 2
    header["padding"] = {"dtype": "F16", "shape": [padding], "data_offsets": [offset, offset + 2 * padding]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
    os.truncate(path, 8 + len(raw) + offset + 2 * padding)
    return path


@pytest.fixture(scope="module")
def made(demo_model_dir, tiny_sdxl_dir, tmp_path_factory) -> dict[str, Path]:
    """Every kind of file, written once: LDM checkpoints of the demo model and the tiny SDXL,
    LoRAs, embeddings, an SDXL ControlNet as a diffusers folder and as an original-layout file."""
    from diffusers import ControlNetModel

    from core.ldm_export import controlnet_to_ldm, save_as_ldm_checkpoint
    from core.models import load_pipeline
    from core.random_models import ensure_random_controlnet

    out = tmp_path_factory.mktemp("made")
    demo = load_pipeline("demo").pipeline
    files = {
        "demo.safetensors": save_as_ldm_checkpoint(demo, out / "demo.safetensors"),
        "demo.ckpt": save_as_ldm_checkpoint(demo, out / "demo.ckpt"),
        "xl.safetensors": save_as_ldm_checkpoint(
            load_pipeline(tiny_sdxl_dir).pipeline, out / "xl.safetensors"
        ),
        "lora-sd1": kohya_lora(out / "lora-sd1.safetensors", "sd1"),
        "lora-sd2": kohya_lora(out / "lora-sd2.safetensors", "sd2"),
        "lora-xl": kohya_lora(out / "lora-xl.safetensors", "sdxl"),
        "lora-xl-peft": peft_lora(out / "lora-xl-peft.safetensors", 2048, second_encoder=True),
        "emb-sd1.pt": a1111_embedding(out / "emb-sd1.pt", 768),
        "emb-sd2.pt": a1111_embedding(out / "emb-sd2.pt", 1024),
        "emb-sd1.safetensors": safetensors_embedding(out / "emb-sd1.safetensors", "sd1"),
        "emb-xl.safetensors": safetensors_embedding(out / "emb-xl.safetensors", "sdxl"),
    }
    controlnet_dir = ensure_random_controlnet("sdxl", "tiny", demo_model_dir.parent.parent)
    net = ControlNetModel.from_pretrained(controlnet_dir)
    save_file(controlnet_to_ldm(net), str(out / "cn-xl.safetensors"))
    files["cn-xl.safetensors"] = out / "cn-xl.safetensors"
    files["cn-xl-dir"] = controlnet_dir
    files["sdxl-dir"] = tiny_sdxl_dir
    files["demo-dir"] = demo_model_dir
    broken = out / "broken.safetensors"  # an interrupted download: the header promises more
    broken.write_bytes(files["lora-sd1"].read_bytes()[:-100])
    files["broken"] = broken
    vae = out / "vae.safetensors"
    save_file(
        {
            "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
            "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
        },
        str(vae),
    )
    files["vae"] = vae
    return files


def place(made: dict[str, Path], root: Path, layout: dict[str, str]) -> Path:
    """Hard links (files) and symbolic links (folders) of `made` at `root/<relative path>`."""
    for relative, key in layout.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if made[key].is_dir():
            target.symlink_to(made[key], target_is_directory=True)
        else:
            os.link(made[key], target)
    return root


def listed(library: ModelLibrary) -> dict[str, dict[str, tuple[str, str]]]:
    """kind → name → (family id, error)."""
    return {
        kind: {e.name: (e.family.id if e.family else "", e.error) for e in entries}
        for kind, entries in library.scan().items()
    }


def assert_listed(found: dict, expected: dict) -> None:
    """`found` (from `listed`) has exactly the expected names, families and errors; an expected
    error is the start of the error."""
    assert found.keys() == expected.keys()
    for kind, entries in expected.items():
        assert found[kind].keys() == entries.keys(), kind
        for name, (family, error) in entries.items():
            got = found[kind][name]
            assert got[0] == family and got[1].startswith(error) and bool(got[1]) == bool(error), (name, got)


COMFY = {
    "models/checkpoints/sd1/demo.safetensors": "demo.safetensors",
    "models/checkpoints/old/demo.ckpt": "demo.ckpt",
    "models/checkpoints/sdxl/tiny-xl.safetensors": "xl.safetensors",
    "models/checkpoints/misplaced-lora.safetensors": "lora-xl",
    "models/checkpoints/broken.safetensors": "broken",
    "models/diffusers/tiny-sdxl": "sdxl-dir",
    "models/loras/sd1-style.safetensors": "lora-sd1",
    "models/loras/xl/detail.safetensors": "lora-xl",
    "models/loras/xl/peft.safetensors": "lora-xl-peft",
    "models/embeddings/bad-hands.pt": "emb-sd1.pt",
    "models/embeddings/xl-negative.safetensors": "emb-xl.safetensors",
    "models/controlnet/xl-canny.safetensors": "cn-xl.safetensors",
    "models/controlnet/xl-canny-diffusers": "cn-xl-dir",
    "models/vae/vae.safetensors": "vae",
}


def test_a_comfyui_tree(made, tmp_path):
    root = place(made, tmp_path / "ComfyUI", COMFY)
    (root / "models/checkpoints/sd1/demo.preview.png").write_bytes(b"not a model")
    (root / "models/checkpoints/notes.txt").write_text("not a model")
    (root / "models/checkpoints/inpaint").mkdir()
    (root / "models/checkpoints/inpaint/model_index.json").write_text(
        '{"_class_name": "StableDiffusionInpaintPipeline"}'
    )
    expected = {
        CHECKPOINT: {
            "sd1/demo.safetensors": ("sd1", ""),
            "old/demo.ckpt": ("sd1", ""),
            "sdxl/tiny-xl.safetensors": ("sdxl", ""),
            "tiny-sdxl": ("sdxl", ""),
            "misplaced-lora.safetensors": ("", "it is a LoRA, not a full model checkpoint"),
            "broken.safetensors": ("", "the file is "),
            # Errors name the entry, not the server's path: they go to the bridge's clients.
            "inpaint": ("", "'inpaint' holds a StableDiffusionInpaintPipeline (an inpainting model)"),
        },
        LORA: {
            "sd1-style.safetensors": ("sd1", ""),
            "xl/detail.safetensors": ("sdxl", ""),
            "xl/peft.safetensors": ("sdxl", ""),
        },
        EMBEDDING: {"bad-hands.pt": ("sd1", ""), "xl-negative.safetensors": ("sdxl", "")},
        CONTROLNET: {"xl-canny.safetensors": ("sdxl", ""), "xl-canny-diffusers": ("sdxl", "")},
    }
    for models_dir in (root, root / "models"):  # the ComfyUI root or its models/ folder
        assert_listed(listed(ModelLibrary([models_dir])), expected)
    library = ModelLibrary([root])
    demo = library.find(CHECKPOINT, "sd1/demo.safetensors")
    assert demo.path == root / "models/checkpoints/sd1/demo.safetensors" and demo.native_size == 512
    assert demo.size == made["demo.safetensors"].stat().st_size
    folder = library.find(CHECKPOINT, "tiny-sdxl")
    assert folder.native_size == 256 and folder.size == sum(
        p.stat().st_size for p in made["sdxl-dir"].rglob("*") if p.is_file()
    )
    broken = library.find(CHECKPOINT, "broken.safetensors")
    assert "incomplete download" in broken.error


A1111 = {
    "models/Stable-diffusion/demo.safetensors": "demo.safetensors",
    "models/Stable-diffusion/demo.config": "demo-dir",  # the tiny demo's own shapes: its sidecar config
    "models/Stable-diffusion/XL/tiny-xl.safetensors": "xl.safetensors",
    "models/Lora/sd2-thing.safetensors": "lora-sd2",
    "models/Lora/sd1.safetensors": "lora-sd1",
    "models/Lora/wrong.safetensors": "emb-sd1.safetensors",
    "models/ControlNet/canny-xl.safetensors": "cn-xl.safetensors",
    "models/VAE/vae.safetensors": "vae",
    "embeddings/sd2-style.pt": "emb-sd2.pt",
    "embeddings/sd1-style.safetensors": "emb-sd1.safetensors",
    "embeddings/xl/neg.safetensors": "emb-xl.safetensors",
}


def test_an_a1111_tree(made, tmp_path):
    root = place(made, tmp_path / "stable-diffusion-webui", A1111)
    assert [(p.relative_to(root).as_posix(), k) for p, k in kind_folders(root)] == [
        ("models/Stable-diffusion", CHECKPOINT),
        ("models/Lora", LORA),
        ("embeddings", EMBEDDING),
        ("models/ControlNet", CONTROLNET),
    ]
    expected = {
        CHECKPOINT: {"demo.safetensors": ("sd1", ""), "XL/tiny-xl.safetensors": ("sdxl", "")},
        LORA: {
            "sd1.safetensors": ("sd1", ""),
            "sd2-thing.safetensors": ("sd2", ""),
            "wrong.safetensors": ("", "it is a textual-inversion embedding, not a LoRA"),
        },
        EMBEDDING: {
            "sd1-style.safetensors": ("sd1", ""),
            "sd2-style.pt": ("sd2", ""),
            "xl/neg.safetensors": ("sdxl", ""),
        },
        CONTROLNET: {"canny-xl.safetensors": ("sdxl", "")},
    }
    assert_listed(listed(ModelLibrary([root])), expected)
    demo = ModelLibrary([root]).find(CHECKPOINT, "demo.safetensors")
    assert demo.config == root / "models/Stable-diffusion/demo.config" and demo.native_size == 64


def test_a_plain_folder_is_classified_by_header(made, tmp_path, caplog):
    root = place(
        made,
        tmp_path / "my models",
        {
            "demo.safetensors": "demo.safetensors",
            "sub/xl.safetensors": "xl.safetensors",
            "tiny-sdxl": "sdxl-dir",
            "style.safetensors": "lora-xl",
            "emb.pt": "emb-sd1.pt",
            "canny": "cn-xl-dir",
            "vae.safetensors": "vae",
            "broken.safetensors": "broken",
        },
    )
    (root / "random.bin").write_bytes(b"\x00" * 100)
    caplog.set_level("INFO", logger="core.model_library")
    found = listed(ModelLibrary([root]))
    assert found == {
        CHECKPOINT: {
            "demo.safetensors": ("sd1", ""),
            "sub/xl.safetensors": ("sdxl", ""),
            "tiny-sdxl": ("sdxl", ""),
        },
        LORA: {"style.safetensors": ("sdxl", "")},
        EMBEDDING: {"emb.pt": ("sd1", "")},
        CONTROLNET: {"canny": ("sdxl", "")},
    }
    skipped = {r.getMessage().split(": ")[1] for r in caplog.records}
    assert skipped == {f"skipped {root / n}" for n in ("vae.safetensors", "broken.safetensors", "random.bin")}


def test_names_are_unique_across_dirs_the_first_dir_wins(made, tmp_path, caplog):
    first = place(made, tmp_path / "a", {"models/checkpoints/model.safetensors": "demo.safetensors"})
    second = place(
        made,
        tmp_path / "b",
        {
            "models/Stable-diffusion/model.safetensors": "xl.safetensors",
            "models/Stable-diffusion/other.safetensors": "xl.safetensors",
        },
    )
    library = ModelLibrary([first, second])
    entries = {e.name: e for e in library.entries(CHECKPOINT)}
    assert entries.keys() == {"model.safetensors", "other.safetensors"}
    assert (
        entries["model.safetensors"].path.is_relative_to(first)
        and entries["model.safetensors"].family.id == "sd1"
    )
    assert "same checkpoint name 'model.safetensors'" in caplog.text
    # The same listing after a restart (a new library on the same dirs), and the other way round.
    assert [e.path for e in ModelLibrary([first, second]).entries(CHECKPOINT)] == [
        e.path for e in library.entries(CHECKPOINT)
    ]
    assert ModelLibrary([second, first]).find(CHECKPOINT, "model.safetensors").family.id == "sdxl"


def test_a_tree_of_large_files_is_listed_from_headers_only(made, tmp_path, monkeypatch):
    """Fifty files, twenty of them 2 GB (sparse): listing reads each header once, no more bytes
    than the headers, in well under a second; a rescan reads nothing."""
    root = tmp_path / "big"
    for i in range(20):
        folder = root / "models/checkpoints" / f"set{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        big_checkpoint(folder / f"model{i}.safetensors", made["xl.safetensors"], 2.0)
    layout = {f"models/loras/l{i}.safetensors": ("lora-sd1", "lora-xl")[i % 2] for i in range(20)}
    layout |= {f"models/embeddings/e{i}.safetensors": "emb-xl.safetensors" for i in range(10)}
    place(made, root, layout)
    ModelLibrary([root / "models/loras"]).scan()  # the lazy imports happen here, not in the timing

    read = {"bytes": 0, "opened": 0}
    real_open = builtins.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read["bytes"] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "b" in mode and str(file).startswith(str(root)):
            read["opened"] += 1
            return Counting(f)
        return f

    monkeypatch.setattr(builtins, "open", counting_open)
    library = ModelLibrary([root])
    t0 = time.perf_counter()
    listing = library.scan()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    library.scan()
    again = time.perf_counter() - t0
    monkeypatch.undo()

    assert len(listing[CHECKPOINT]) == 20 and {e.family.id for e in listing[CHECKPOINT]} == {"sdxl"}
    assert all(e.size > 2 * 1024**3 - 1 and not e.error for e in listing[CHECKPOINT])
    assert len(listing[LORA]) == 20 and len(listing[EMBEDDING]) == 10
    headers = sum(8 + int.from_bytes(p.open("rb").read(8), "little") for p in root.rglob("*.safetensors"))
    assert read["opened"] == 50 and read["bytes"] == headers and library.headers_read == 50
    print(
        f"listing 50 files (20 × 2 GB): {first * 1000:.1f} ms, again {again * 1000:.1f} ms; {headers} header bytes read"
    )
    assert first < 0.5 and again < 0.1


def test_new_changed_and_removed_files_are_seen_on_the_next_listing(made, tmp_path):
    root = place(made, tmp_path / "ComfyUI", {"models/checkpoints/a.safetensors": "demo.safetensors"})
    library = ModelLibrary([root], max_age=3600)
    assert [e.name for e in library.entries(CHECKPOINT)] == ["a.safetensors"] and library.headers_read == 1

    place(
        made,
        root,
        {"models/checkpoints/new/b.safetensors": "xl.safetensors", "models/loras/l.safetensors": "lora-sd1"},
    )
    assert [e.name for e in library.entries(CHECKPOINT)] == ["a.safetensors"]  # within max_age
    assert library.find(CHECKPOINT, "new/b.safetensors").family.id == "sdxl"  # find rescans once
    assert [e.name for e in library.entries(LORA)] == ["l.safetensors"] and library.headers_read == 3

    changed = root / "models/checkpoints/a.safetensors"
    changed.unlink()
    shutil.copyfile(made["xl.safetensors"], changed)
    assert library.scan()[CHECKPOINT][0].family.id == "sdxl" and library.headers_read == 4
    (root / "models/loras/l.safetensors").unlink()
    assert library.scan()[LORA] == [] and library.headers_read == 4


def test_resolving_a_name(made, tmp_path, monkeypatch):
    root = place(made, tmp_path / "ComfyUI", {k: v for k, v in COMFY.items() if "checkpoints" in k})
    library = ModelLibrary([root])
    assert resolve_model_name("sd1/demo.safetensors", library) == (
        str(root / "models/checkpoints/sd1/demo.safetensors"),
        None,
    )
    assert resolve_model_name("demo", library) == ("demo", None)
    assert resolve_model_name("owner/hub-model", library) == ("owner/hub-model", None)
    monkeypatch.chdir(root / "models/checkpoints")  # an existing path is itself, as without a library
    assert resolve_model_name("sd1/demo.safetensors", library) == ("sd1/demo.safetensors", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelLoadError, match="'misplaced-lora.safetensors' of the model folders cannot be used: it is a LoRA"
    ):
        resolve_model_name("misplaced-lora.safetensors", library)


# --- families from names and shapes ---------------------------------------------------------------
def names(shapes: dict[str, tuple[int, ...]], **metadata: str) -> WeightNames:
    return WeightNames(shapes, metadata)


@pytest.mark.parametrize(
    ("shapes", "metadata", "family", "width"),
    [
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
                    8,
                    768,
                )
            },
            {},
            "sd1",
            768,
        ),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
                    8,
                    1024,
                )
            },
            {},
            "sd2",
            1024,
        ),
        (
            {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (8, 2048)},
            {},
            "sdxl",
            2048,
        ),
        (
            {"unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048)},
            {},
            "sdxl",
            2048,
        ),
        (
            {
                "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (
                    4,
                    768,
                )
            },
            {},
            "sd1",
            768,
        ),
        (
            {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b": (8, 768)},
            {},
            None,
            None,
        ),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b.weight": (
                    8,
                    768,
                )
            },
            {},
            "sd1",
            768,
        ),
        # Text encoders only: a second one is SDXL; the first one's width tells SD 1.x from 2.x.
        (
            {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280)},
            {},
            "sdxl",
            None,
        ),
        (
            {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024)},
            {},
            "sd2",
            None,
        ),
        # A small test model's width: kohya's SDXL names, then the metadata, else unknown.
        (
            {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 80)},
            {},
            "sdxl",
            80,
        ),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
                    4,
                    32,
                )
            },
            {"ss_base_model_version": "sd_v1"},
            "sd1",
            32,
        ),
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)},
            {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
            "sdxl",
            None,
        ),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
                    4,
                    32,
                )
            },
            {},
            None,
            32,
        ),
    ],
)
def test_lora_family(shapes, metadata, family, width):
    weights = names(shapes, **metadata)
    assert kind_of(weights) == LORA
    found, found_width = lora_family(weights)
    assert (found.id if found else None, found_width) == (family, width)


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        ({"emb_params": (3, 768)}, "sd1"),
        ({"emb_params": (3, 1024)}, "sd2"),
        ({"clip_l": (3, 768), "clip_g": (3, 1280)}, "sdxl"),
        ({"string_to_param.*": (2, 768), "string_to_token.*": ()}, "sd1"),
        ({"<cat-toy>": (768,)}, "sd1"),  # diffusers' learned_embeds.bin
        ({"emb_params": (3, 32)}, None),  # a small test model's
    ],
)
def test_embedding_family(shapes, family):
    weights = names(shapes)
    assert kind_of(weights) == EMBEDDING
    found = embedding_family(weights)
    assert (found.id if found else None) == family


def test_unsupported_checkpoints_are_listed_with_the_reason(tmp_path):
    folder = tmp_path / "models/checkpoints"
    folder.mkdir(parents=True)
    save_file(
        {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)},
        str(folder / "flux.safetensors"),
    )
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 9, 3, 3),
            "cond_stage_model.transformer.x": torch.zeros(1),
        },
        str(folder / "inpainting.safetensors"),
    )
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, folder / "unet.pth")
    errors = {e.name: e.error for e in ModelLibrary([tmp_path]).entries(CHECKPOINT)}
    assert "Flux" in errors["flux.safetensors"]
    assert "inpainting model" in errors["inpainting.safetensors"]
    assert errors["unet.pth"] == "a model file must be .safetensors or .ckpt, not .pth"


def test_the_wire_knows_the_kinds():
    assert wire.LIBRARY_KINDS == KINDS


# --- the command line -------------------------------------------------------------------------------
def test_the_cli_generates_with_a_library_checkpoint(made, tmp_path, capsys):
    from core.cli import main

    root = place(made, tmp_path / "webui", A1111)
    out = tmp_path / "out.png"
    args = ["generate", str(EXAMPLES / "room.ora"), "-o", str(out), "--steps", "2", "--models-dir", str(root)]
    assert main([*args, "--model", "demo.safetensors"]) == 0, capsys.readouterr().err
    assert out.is_file()
    assert str(root / "models/Stable-diffusion/demo.safetensors") in capsys.readouterr().err  # loaded from

    assert main([*args, "--model", "no-such.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "no-such.safetensors" in err and "demo.safetensors" in err  # the names it has


# --- the bridge ---------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_the_bridge_lists_the_model_folders_and_runs_a_library_checkpoint(
    aiohttp_client, made, tmp_path
):
    from bridge_server import testing as T
    from bridge_server.app import create_app
    from bridge_server.config import BridgeConfig
    from bridge_server.keys import MANAGER

    webui = place(made, tmp_path / "webui", A1111)
    comfy = place(made, tmp_path / "ComfyUI", COMFY)
    config = BridgeConfig(data_dir=tmp_path / "bridge", preview_interval=0.0, models_dirs=(webui, comfy))
    client = await aiohttp_client(create_app(config))
    raw = await (await client.get(wire.ROUTE_INFO)).json()
    assert str(tmp_path) not in json.dumps(raw)  # names only: no path of the server leaves it
    info = wire.InfoResponse.from_dict(raw)
    assert info.model == "demo" and info.models == [
        "demo",
        "demo.safetensors",
        "old/demo.ckpt",
        "sd1/demo.safetensors",
        "sdxl/tiny-xl.safetensors",
        "tiny-sdxl",
        "XL/tiny-xl.safetensors",
    ]
    assert info.details("demo.safetensors") == wire.ModelDetails(
        "demo.safetensors", "sd1", "Stable Diffusion 1.x", 64, 8
    )
    assert info.details("tiny-sdxl") == wire.ModelDetails("tiny-sdxl", "sdxl", "Stable Diffusion XL", 256, 64)
    unusable = {e.name: e.error for e in info.checkpoints if e.error}
    assert unusable.keys() == {"broken.safetensors", "misplaced-lora.safetensors"}
    assert len(info.checkpoints) == len(info.models) - 1 + len(unusable)
    assert [(e.name, e.family) for e in info.loras] == [
        ("sd1-style.safetensors", "sd1"),
        ("sd1.safetensors", "sd1"),
        ("sd2-thing.safetensors", "sd2"),
        ("wrong.safetensors", ""),
        ("xl/detail.safetensors", "sdxl"),
        ("xl/peft.safetensors", "sdxl"),
    ]
    assert info.loras[0] == wire.LibraryEntry(
        "sd1-style.safetensors", "lora", "sd1", "Stable Diffusion 1.x", made["lora-sd1"].stat().st_size
    )
    assert {e.name for e in info.embeddings} == {
        "bad-hands.pt",
        "sd1-style.safetensors",
        "sd2-style.pt",
        "xl-negative.safetensors",
        "xl/neg.safetensors",
    }
    assert {(e.name, e.family) for e in info.controlnets} == {
        ("canny-xl.safetensors", "sdxl"),
        ("xl-canny-diffusers", "sdxl"),
        ("xl-canny.safetensors", "sdxl"),
    }

    # A job naming the demo model's single file (with its sidecar config) runs on it.
    r = await T.submit(client, T.small_request(steps=3, model="demo.safetensors"))
    assert r.status == 202, await r.text()
    done = await T.wait_done(client, (await r.json())["id"])
    assert done.state == wire.DONE and done.model == "demo.safetensors", done.error
    assert [(res.width, res.height) for res in done.results] == [(64, 64)]
    engine = client.app[MANAGER].engine
    assert engine.current_ref == "demo.safetensors"
    assert engine.current.identity.startswith(f"file:{webui / 'models/Stable-diffusion/demo.safetensors'}|")

    # Only names of the bridge: not a path (even of a library file), not an unusable entry.
    for name in (
        "nope.safetensors",
        str(webui / "models/Stable-diffusion/demo.safetensors"),
        "misplaced-lora.safetensors",
    ):
        r = await T.submit(client, T.small_request(model=name))
        problems = (await r.json())["problems"]
        assert r.status == 422 and problems[0].startswith(f"model: {name!r} is not a model of this bridge"), (
            problems
        )

    # A checkpoint added while the bridge runs can be named at once, and /info lists it.
    manager = client.app[MANAGER]
    manager.pause()
    place(made, webui, {"models/Stable-diffusion/new/xl.safetensors": "xl.safetensors"})
    r = await T.submit(client, T.small_request(model="new/xl.safetensors"))
    assert r.status == 202, await r.text()
    await client.post(wire.route(wire.ROUTE_JOB_CANCEL, job_id=(await r.json())["id"]))
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    assert "new/xl.safetensors" in info.models


def test_the_bridge_command_line_takes_models_dirs(tmp_path, capsys):
    from bridge_server.__main__ import config_from_args, main, parser

    (tmp_path / "a").mkdir()
    config = config_from_args(
        parser().parse_args(["--models-dir", str(tmp_path / "a"), "--models-dir", "~/b"])
    )
    assert config.models_dirs == (tmp_path / "a", Path.home() / "b")
    assert main(["--models-dir", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "data")]) == 2
    assert f"--models-dir {tmp_path / 'missing'}: not a folder" in capsys.readouterr().err


def test_the_default_model_may_be_a_library_name(made, tmp_path):
    from bridge_server.catalog import ModelCatalog
    from bridge_server.config import BridgeConfig

    webui = place(made, tmp_path / "webui", A1111)
    folder = webui / "models/Stable-diffusion"
    config = BridgeConfig(
        data_dir=tmp_path / "data",
        model="demo.safetensors",
        allowed_models=("owner/hub",),
        models_dirs=(webui,),
    )
    catalog = ModelCatalog(config)
    assert catalog.names() == ["demo.safetensors", "owner/hub", "XL/tiny-xl.safetensors"]
    assert catalog.resolve("demo.safetensors") == (
        str(folder / "demo.safetensors"),
        str(folder / "demo.config"),
    )
    assert catalog.resolve("XL/tiny-xl.safetensors") == (str(folder / "XL/tiny-xl.safetensors"), None)
    assert catalog.resolve("owner/hub") == ("owner/hub", None)
    (folder / "XL/tiny-xl.safetensors").unlink()  # gone before its job ran
    with pytest.raises(ModelLoadError, match="'XL/tiny-xl.safetensors' is no longer in the model folders"):
        catalog.resolve("XL/tiny-xl.safetensors")
