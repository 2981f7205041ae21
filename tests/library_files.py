"""Model files of every kind, written by the project, and folder trees of them: what the model
library's tests (test_model_library.py, test_bridge_library.py) list. Only names and shapes matter
for listing, so LoRAs and embeddings are zeros; checkpoints are real (the demo model, the tiny SDXL)
so that a job can run on them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from core.model_library import ModelLibrary
from core.weight_files import read_safetensors_header


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


def header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A .safetensors file with these names and shapes whose data is a hole (never written):
    real-size IP-Adapters and image encoders for listing."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return path


def real_ip_adapter(path: Path, width: int, embeds: int, plus: bool = False) -> Path:
    """An IP-Adapter's names and shapes at a family's width (`width`: 768 SD 1.x, 2048 SDXL),
    reading `embeds`-wide image features; two of its cross-attention layers suffice for listing."""
    shapes: dict[str, tuple[int, ...]] = {
        "ip_adapter.1.to_k_ip.weight": (320, width),
        "ip_adapter.1.to_v_ip.weight": (320, width),
        "ip_adapter.3.to_k_ip.weight": (320, width),
        "ip_adapter.3.to_v_ip.weight": (320, width),
    }
    if plus:
        shapes |= {"image_proj.latents": (1, 16, 768), "image_proj.proj_in.weight": (768, embeds)}
    else:
        shapes |= {"image_proj.proj.weight": (4 * width, embeds), "image_proj.norm.weight": (width,)}
    return header_only(path, shapes)


def real_image_encoder(path: Path, width: int, projection: int) -> Path:
    """A CLIP image encoder's names and shapes (ViT-H/14: 1280 wide, 1024-wide embeddings)."""
    return header_only(
        path,
        {
            "vision_model.embeddings.class_embedding": (width,),
            "vision_model.embeddings.patch_embedding.weight": (width, 3, 14, 14),
            "visual_projection.weight": (projection, width),
        },
    )


def ip_adapter_files(out: Path, demo_model_dir: Path) -> dict[str, Path]:
    """Real-shaped IP-Adapters (SD 1.5's, SDXL's base and plus) and image encoders (ViT-H, bigG)
    for listing, and tiny random ones that run on the demo model."""
    from core.models import load_pipeline
    from core.random_ip_adapter import (
        build_random_image_encoder,
        random_ip_adapter_state,
        save_image_encoder,
        save_ip_adapter,
    )

    demo = load_pipeline("demo").pipeline
    encoder = build_random_image_encoder()
    return {
        "ipa-sd15": real_ip_adapter(out / "ip-adapter_sd15.safetensors", 768, 1024),
        "ipa-sdxl": real_ip_adapter(out / "ip-adapter_sdxl.safetensors", 2048, 1280),
        "ipa-plus-sdxl-vith": real_ip_adapter(
            out / "ip-adapter-plus_sdxl_vit-h.safetensors", 2048, 1280, plus=True
        ),
        "vit-h": real_image_encoder(out / "CLIP-ViT-H-14.safetensors", 1280, 1024),
        "vit-bigg": real_image_encoder(out / "CLIP-ViT-bigG-14.safetensors", 1664, 1280),
        "ipa-demo": save_ip_adapter(random_ip_adapter_state(demo.unet, 24, scale=3.0), out / "ipa-demo.bin"),
        "vit-tiny": save_image_encoder(encoder, out / "vit-tiny.safetensors"),
        "vit-tiny-dir": save_image_encoder(encoder, out / "vit-tiny"),
    }


def make_library_files(out: Path, demo_model_dir: Path, tiny_sdxl_dir: Path) -> dict[str, Path]:
    """Every kind of file, written once: LDM checkpoints of the demo model and the tiny SDXL,
    LoRAs, embeddings, an SDXL ControlNet as a diffusers folder and as an original-layout file."""
    from diffusers import ControlNetModel

    from core.ldm_export import controlnet_to_ldm, save_as_ldm_checkpoint
    from core.models import load_pipeline
    from core.random_models import ensure_random_controlnet

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
    files |= ip_adapter_files(out, demo_model_dir)
    return files


def place(files: dict[str, Path], root: Path, layout: dict[str, str]) -> Path:
    """Hard links (files) and symbolic links (folders) of `files` at `root/<relative path>`."""
    for relative, key in layout.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if files[key].is_dir():
            target.symlink_to(files[key], target_is_directory=True)
        else:
            os.link(files[key], target)
    return root


def listed(library: ModelLibrary) -> dict[str, dict[str, tuple[str, str]]]:
    """kind → name → (family id, error)."""
    return {
        kind: {e.name: (e.family.id if e.family else "", e.error) for e in entries}
        for kind, entries in library.scan().items()
    }


def assert_listed(found: dict, expected: dict) -> None:
    """`found` (from `listed`) has exactly the expected names, families and errors; an expected
    error is the start of the error. A kind `expected` does not name must have no entry."""
    assert expected.keys() <= found.keys()
    expected = {kind: expected.get(kind, {}) for kind in found}
    for kind, entries in expected.items():
        assert found[kind].keys() == entries.keys(), kind
        for name, (family, error) in entries.items():
            got = found[kind][name]
            assert got[0] == family and got[1].startswith(error) and bool(got[1]) == bool(error), (name, got)


# A ComfyUI tree: mapping of path -> key of make_library_files.
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
    "models/ipadapter/ip-adapter_sd15.safetensors": "ipa-sd15",
    "models/ipadapter/sdxl/ip-adapter_sdxl.safetensors": "ipa-sdxl",
    "models/ipadapter/sdxl/ip-adapter-plus_sdxl_vit-h.safetensors": "ipa-plus-sdxl-vith",
    "models/ipadapter/tiny/ipa-demo.bin": "ipa-demo",
    "models/ipadapter/misplaced.safetensors": "vit-h",
    "models/clip_vision/CLIP-ViT-H-14.safetensors": "vit-h",
    "models/clip_vision/tiny-vit": "vit-tiny-dir",
}


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
