"""The model library (core/model_library.py, core/weight_files.py): ComfyUI, A1111/Forge and plain
folders listed by name, kind and family from headers only, large files without reading them, new
files without a restart; the CLI's --models-dir. The bridge's is in test_bridge_library.py."""

from __future__ import annotations

import builtins
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.ip_adapter_files import IPAdapterFiles
from core.model_library import (
    ModelLibrary,
    find_ip_adapter,
    ip_adapter_families,
    kind_folders,
    resolve_model_name,
)
from core.model_sources import ModelLoadError
from core.weight_files import (
    CHECKPOINT,
    CLIP_VISION,
    CONTROLNET,
    EMBEDDING,
    IPADAPTER,
    KINDS,
    LORA,
    WeightNames,
    embedding_family,
    kind_of,
    lora_family,
)
from krita_plugin.collage_diffusion import wire
from tests.library_files import A1111, COMFY, assert_listed, big_checkpoint, listed, place

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_a_comfyui_tree(library_files, tmp_path):
    root = place(library_files, tmp_path / "ComfyUI", COMFY)
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
        IPADAPTER: {
            "ip-adapter_sd15.safetensors": ("sd1", ""),
            "sdxl/ip-adapter_sdxl.safetensors": ("sdxl", ""),
            "sdxl/ip-adapter-plus_sdxl_vit-h.safetensors": ("sdxl", ""),
            "tiny/ipa-demo.bin": ("", ""),  # 32 wide: no family's width
            "misplaced.safetensors": ("", "it is a CLIP image encoder, not an IP-Adapter"),
        },
        CLIP_VISION: {"CLIP-ViT-H-14.safetensors": ("", ""), "tiny-vit": ("", "")},
    }
    for models_dir in (root, root / "models"):  # the ComfyUI root or its models/ folder
        assert_listed(listed(ModelLibrary([models_dir])), expected)
    library = ModelLibrary([root])
    demo = library.find(CHECKPOINT, "sd1/demo.safetensors")
    assert demo.path == root / "models/checkpoints/sd1/demo.safetensors" and demo.native_size == 512
    assert demo.size == library_files["demo.safetensors"].stat().st_size
    folder = library.find(CHECKPOINT, "tiny-sdxl")
    assert folder.native_size == 256 and folder.size == sum(
        p.stat().st_size for p in library_files["sdxl-dir"].rglob("*") if p.is_file()
    )
    broken = library.find(CHECKPOINT, "broken.safetensors")
    assert "incomplete download" in broken.error


def test_an_a1111_tree(library_files, tmp_path):
    root = place(library_files, tmp_path / "stable-diffusion-webui", A1111)
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


def test_a_plain_folder_is_classified_by_header(library_files, tmp_path, caplog):
    root = place(
        library_files,
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
            "ipa/sd15.safetensors": "ipa-sd15",
            "vision": "vit-tiny-dir",
            "vision-h.safetensors": "vit-h",
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
        IPADAPTER: {"ipa/sd15.safetensors": ("sd1", "")},
        CLIP_VISION: {"vision": ("", ""), "vision-h.safetensors": ("", "")},
    }
    skipped = {r.getMessage().split(": ")[1] for r in caplog.records}
    assert skipped == {f"skipped {root / n}" for n in ("vae.safetensors", "broken.safetensors", "random.bin")}


def test_names_are_unique_across_dirs_the_first_dir_wins(library_files, tmp_path, caplog):
    first = place(library_files, tmp_path / "a", {"models/checkpoints/model.safetensors": "demo.safetensors"})
    second = place(
        library_files,
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


def test_a_tree_of_large_files_is_listed_from_headers_only(library_files, tmp_path, monkeypatch):
    """Fifty files, twenty of them 2 GB (sparse): listing reads each header once, no more bytes
    than the headers, in well under a second; a rescan reads nothing."""
    root = tmp_path / "big"
    for i in range(20):
        folder = root / "models/checkpoints" / f"set{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        big_checkpoint(folder / f"model{i}.safetensors", library_files["xl.safetensors"], 2.0)
    layout = {f"models/loras/l{i}.safetensors": ("lora-sd1", "lora-xl")[i % 2] for i in range(20)}
    layout |= {f"models/embeddings/e{i}.safetensors": "emb-xl.safetensors" for i in range(10)}
    place(library_files, root, layout)
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
    rescan_opened = read["opened"]
    monkeypatch.undo()

    assert len(listing[CHECKPOINT]) == 20 and {e.family.id for e in listing[CHECKPOINT]} == {"sdxl"}
    assert all(e.size > 2 * 1024**3 - 1 and not e.error for e in listing[CHECKPOINT])
    assert len(listing[LORA]) == 20 and len(listing[EMBEDDING]) == 10
    headers = sum(8 + int.from_bytes(p.open("rb").read(8), "little") for p in root.rglob("*.safetensors"))
    assert read["opened"] == 50 and read["bytes"] == headers and library.headers_read == 50
    print(
        f"listing 50 files (20 × 2 GB): {first * 1000:.1f} ms, again {again * 1000:.1f} ms; {headers} header bytes read"
    )
    # Speed is shown by what is read, not by a clock (40-60 ms on an idle machine, mostly parsing
    # the headers' JSON; reading the 40 GB of data instead would take minutes): the rescan of an
    # unchanged tree opens no file and reads no header again.
    assert rescan_opened == 50 and library.headers_read == 50


def test_new_changed_and_removed_files_are_seen_on_the_next_listing(library_files, tmp_path):
    root = place(
        library_files, tmp_path / "ComfyUI", {"models/checkpoints/a.safetensors": "demo.safetensors"}
    )
    library = ModelLibrary([root], max_age=3600)
    assert [e.name for e in library.entries(CHECKPOINT)] == ["a.safetensors"] and library.headers_read == 1

    place(
        library_files,
        root,
        {"models/checkpoints/new/b.safetensors": "xl.safetensors", "models/loras/l.safetensors": "lora-sd1"},
    )
    assert [e.name for e in library.entries(CHECKPOINT)] == ["a.safetensors"]  # within max_age
    assert library.find(CHECKPOINT, "new/b.safetensors").family.id == "sdxl"  # find rescans once
    assert [e.name for e in library.entries(LORA)] == ["l.safetensors"] and library.headers_read == 3

    changed = root / "models/checkpoints/a.safetensors"
    changed.unlink()
    shutil.copyfile(library_files["xl.safetensors"], changed)
    assert library.scan()[CHECKPOINT][0].family.id == "sdxl" and library.headers_read == 4
    (root / "models/loras/l.safetensors").unlink()
    assert library.scan()[LORA] == [] and library.headers_read == 4


def test_resolving_a_name(library_files, tmp_path, monkeypatch):
    root = place(library_files, tmp_path / "ComfyUI", {k: v for k, v in COMFY.items() if "checkpoints" in k})
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


# kohya's names of a cross-attention key projection: SD 1.x/2.x (diffusers' blocks), SDXL (LDM's).
KOHYA_SD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
KOHYA_XL = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
PEFT = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"
Q_PROJ = "text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"


@pytest.mark.parametrize(
    ("shapes", "metadata", "family", "width"),
    [
        ({f"{KOHYA_SD}.lora_down.weight": (8, 768)}, {}, "sd1", 768),
        ({f"{KOHYA_SD}.lora_down.weight": (8, 1024)}, {}, "sd2", 1024),
        ({f"{KOHYA_XL}.lora_down.weight": (8, 2048)}, {}, "sdxl", 2048),
        ({f"{PEFT}.to_k.lora_A.weight": (4, 2048)}, {}, "sdxl", 2048),
        ({f"{PEFT}.processor.to_k_lora.down.weight": (4, 768)}, {}, "sd1", 768),  # diffusers' old format
        ({f"{KOHYA_SD}.hada_w1_b": (8, 768)}, {}, "sd1", 768),  # LyCORIS LoHa: no ".weight"
        # Text encoders only: a second one is SDXL; the first one's width tells SD 1.x from 2.x.
        ({f"lora_te2_{Q_PROJ}": (4, 1280)}, {}, "sdxl", None),
        ({f"lora_te_{Q_PROJ}": (4, 1024)}, {}, "sd2", None),
        # A small test model's width: kohya's SDXL names, then the metadata, else unknown.
        ({f"{KOHYA_XL}.lora_down.weight": (4, 80)}, {}, "sdxl", 80),
        ({f"{KOHYA_SD}.lora_down.weight": (4, 32)}, {"ss_base_model_version": "sd_v1"}, "sd1", 32),
        (
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)},
            {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
            "sdxl",
            None,
        ),
        ({f"{KOHYA_SD}.lora_down.weight": (4, 32)}, {}, None, 32),
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


def test_ip_adapters_pair_with_an_image_encoder_they_read(library_files, tmp_path):
    """An IP-Adapter's family is its tokens' width; it is offered with the first image encoder
    whose features it reads (SD 1.5's and the SDXL plus-ViT-H read ViT-H, SDXL's base bigG)."""
    root = place(library_files, tmp_path / "ComfyUI", COMFY)
    library = ModelLibrary([root])
    adapters = {e.name: e.ip_adapter for e in library.entries(IPADAPTER) if e.usable}
    assert adapters["ip-adapter_sd15.safetensors"].image_embed_dim == 1024
    assert adapters["sdxl/ip-adapter-plus_sdxl_vit-h.safetensors"].kind == "plus"
    assert ip_adapter_families(library) == ["sd1", "sdxl"]
    models = root / "models"
    assert find_ip_adapter(library, 768) == IPAdapterFiles(
        models / "ipadapter/ip-adapter_sd15.safetensors", models / "clip_vision/CLIP-ViT-H-14.safetensors"
    )
    assert find_ip_adapter(library, 2048) == IPAdapterFiles(
        models / "ipadapter/sdxl/ip-adapter-plus_sdxl_vit-h.safetensors",
        models / "clip_vision/CLIP-ViT-H-14.safetensors",
    )
    assert find_ip_adapter(library, 32) == IPAdapterFiles(
        models / "ipadapter/tiny/ipa-demo.bin", models / "clip_vision/tiny-vit"
    )
    assert find_ip_adapter(library, 1024) is None  # no SD 2.x adapter
    # SDXL's base adapter with bigG only; SD 1.5's has no encoder then.
    other = place(
        library_files,
        tmp_path / "other",
        {
            "models/ipadapter/ip-adapter_sdxl.safetensors": "ipa-sdxl",
            "models/ipadapter/ip-adapter_sd15.safetensors": "ipa-sd15",
            "models/clip_vision/bigG.safetensors": "vit-bigg",
        },
    )
    library = ModelLibrary([other])
    assert ip_adapter_families(library) == ["sdxl"]
    assert find_ip_adapter(library, 2048).image_encoder == other / "models/clip_vision/bigG.safetensors"
    assert ip_adapter_families(None) == [] and find_ip_adapter(None, 768) is None


def test_the_wire_knows_the_kinds():
    assert wire.LIBRARY_KINDS == KINDS


# --- the command line -------------------------------------------------------------------------------
def test_the_cli_generates_with_a_library_checkpoint(library_files, tmp_path, capsys):
    from core.cli import main

    root = place(library_files, tmp_path / "webui", A1111)
    out = tmp_path / "out.png"
    args = ["generate", str(EXAMPLES / "room.ora"), "-o", str(out), "--steps", "2", "--models-dir", str(root)]
    assert main([*args, "--model", "demo.safetensors"]) == 0, capsys.readouterr().err
    assert out.is_file()
    assert str(root / "models/Stable-diffusion/demo.safetensors") in capsys.readouterr().err  # loaded from

    assert main([*args, "--model", "no-such.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "no-such.safetensors" in err and "demo.safetensors" in err  # the names it has


def test_the_cli_finds_the_ip_adapter_in_the_models_dir_or_takes_it_named(library_files, tmp_path, capsys):
    from core.cli import main

    doc = tmp_path / "bento"
    shutil.copytree(EXAMPLES / "bento", doc)
    manifest = doc / "collage.toml"
    manifest.write_text(
        manifest.read_text().replace('text = "rice"', 'text = "rice"\nappearance = "ip-adapter"')
    )
    assert main(["inspect", str(doc)]) == 0
    assert "'rice': " in (shown := capsys.readouterr().out) and "appearance ip-adapter 1\n" in shown
    out = tmp_path / "out.png"
    args = ["generate", str(doc), "-o", str(out), "--steps", "2", "--model", "demo"]
    assert main(args) == 2  # no IP-Adapter anywhere
    assert (
        'layers[0].appearance: "ip-adapter" needs an IP-Adapter for Stable Diffusion 1.x'
        in capsys.readouterr().err
    )
    root = place(library_files, tmp_path / "ComfyUI", COMFY)
    assert main([*args, "--models-dir", str(root)]) == 0, capsys.readouterr().err
    assert out.is_file()
    named = [
        "--ip-adapter",
        str(library_files["ipa-demo"]),
        "--image-encoder",
        str(library_files["vit-tiny"]),
    ]
    assert main([*args, *named]) == 0, capsys.readouterr().err
    assert main([*args, *named[:2]]) == 2
    assert "--ip-adapter, --image-encoder: give both" in capsys.readouterr().err


# --- the bridge ---------------------------------------------------------------------------------------
