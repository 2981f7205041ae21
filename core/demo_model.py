"""The built-in demo model: a tiny Stable-Diffusion-shaped pipeline trained in this repository.

It needs no download and no GPU, so the whole engine (layers, attention control, inversion,
ControlNet, the Krita bridge) can be tried and tested anywhere. It was trained on CPU on a
synthetic data set of coloured shapes (`training/`, docs/demo_model.md): ask it for "a red
circle and a blue star on grass" at 64x64 pixels. The tokenizer is the real CLIP tokenizer
(built from the CLIP BPE merges shipped in `core/assets`), so prompts split into exactly the
tokens SD 1.x sees.

The weights ship with the project as one float16 file (`DEMO_WEIGHTS_FILE`, a few MB) and are
unpacked on first use into the cache as an ordinary diffusers folder, which `core.models` then
loads like any SD 1.x model folder. The shapes follow SD 1.x where the rest of the code depends
on them: the VAE downsamples by 8 into 4 latent channels, the U-Net has self- (`attn1`) and
cross-attention (`attn2`) at the full latent resolution and at half of it, and the text encoder
gives 77 tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .paths import cache_dir as default_cache_dir

DEMO_MODEL_ID = "demo"
# Bump when the recipe below changes: a new folder name makes every install rebuild.
DEMO_VERSION = "demo-v2"
# The trained weights (see docs/demo_model.md): float16, one file, with each part's configuration.
DEMO_WEIGHTS_FILE = Path(__file__).parent / "assets" / f"{DEMO_VERSION}.safetensors"
PACK_FORMAT = "collage-diffusion-demo"

BPE_MERGES_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same with "</w>", the merges, then 2 special tokens.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2
CLIP_MAX_LENGTH = 77
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# Stale temporary build folders (from a crashed build) older than this are removed.
_STALE_BUILD_SECONDS = 3600


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (used by CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    with gzip.open(BPE_MERGES_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a header; CLIP uses exactly the first CLIP_NUM_MERGES merges.
    merges = lines[1 : 1 + CLIP_NUM_MERGES]
    return tuple(tuple(m.split()) for m in merges)  # type: ignore[misc]


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt into `folder`; returns their paths."""
    merges = _clip_merges()
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )
    return vocab_file, merges_file


def build_clip_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """The real CLIP (SD 1.x) tokenizer, built offline from the bundled BPE merges."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_clip_tokenizer_files(Path(folder or tmp))
        # model_max_length is required: without it padding to max length overflows.
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)


def pack_demo_weights(
    pipeline: StableDiffusionPipeline, out: str | os.PathLike[str], controlnet=None
) -> Path:
    """Write `pipeline` (and optionally its `controlnet`) as one float16 safetensors file.

    Keys are prefixed with the component (``unet.``, ``vae.``, ``text_encoder.``,
    ``controlnet.``); each component's configuration is stored as JSON metadata. The tokenizer is
    not stored: it is the real CLIP tokenizer, rebuilt from the bundled BPE merges.
    """
    from safetensors.torch import save_file

    def plain(config) -> dict:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    parts = {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
    if controlnet is not None:
        parts["controlnet"] = controlnet
    tensors: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to(torch.float16).contiguous()
    metadata = {
        "format": PACK_FORMAT,
        "scheduler": json.dumps(plain(pipeline.scheduler.config)),
        "text_encoder": json.dumps(
            {k: v for k, v in pipeline.text_encoder.config.to_dict().items() if k != "_name_or_path"}
        ),
    }
    for name in ("unet", "vae", "controlnet"):
        if name in parts:
            metadata[name] = json.dumps(plain(parts[name].config))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _read_pack(weights_file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not Path(weights_file).is_file():
        raise FileNotFoundError(
            f"the demo model's weights are missing: {weights_file} (they come with the project; "
            "restore the file from the repository, e.g. `git checkout -- core/assets`)"
        )
    with safe_open(str(weights_file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != PACK_FORMAT:
            raise ValueError(f"{weights_file}: not a demo model weights file")
        tensors = {key: f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118
    return meta, tensors


def _load_part(module, name: str, tensors: dict[str, torch.Tensor]):
    prefix = name + "."
    module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return module.eval()


def build_demo_pipeline(weights_file: str | os.PathLike[str] = DEMO_WEIGHTS_FILE) -> StableDiffusionPipeline:
    """The demo pipeline from its packed weights file (float16 on disk, float32 in memory)."""
    meta, tensors = _read_pack(Path(weights_file))
    # Module construction draws (then discarded) random weights: leave the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel.from_config(json.loads(meta["unet"]))
        vae = AutoencoderKL.from_config(json.loads(meta["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(json.loads(meta["text_encoder"])))
    pipe = StableDiffusionPipeline(
        vae=_load_part(vae, "vae", tensors),
        text_encoder=_load_part(text_encoder, "text_encoder", tensors),
        tokenizer=build_clip_tokenizer(),
        unet=_load_part(unet, "unet", tensors),
        scheduler=DDIMScheduler.from_config(json.loads(meta["scheduler"])),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_demo_controlnet(weights_file: str | os.PathLike[str] = DEMO_WEIGHTS_FILE):
    """The demo model's edge ControlNet from the packed weights file, or None if it has none."""
    from diffusers import ControlNetModel

    meta, tensors = _read_pack(Path(weights_file))
    if "controlnet" not in meta:
        return None
    with torch.random.fork_rng(devices=[]):
        net = ControlNetModel.from_config(json.loads(meta["controlnet"]))
    return _load_part(net, "controlnet", tensors)


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo model lives (whether or not it is unpacked yet)."""
    return (cache_dir or default_cache_dir()) / "models" / DEMO_VERSION


def demo_controlnet_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo model's edge ControlNet lives (whether or not it is unpacked yet)."""
    return (cache_dir or default_cache_dir()) / "models" / f"{DEMO_VERSION}-controlnet"


def _is_complete(folder: Path, marker: str) -> bool:
    # The folder only appears by renaming a finished build into place, so the marker file in
    # it means a complete model (its absence: something else left a partial folder there).
    return (folder / marker).is_file()


def _remove_stale_builds(models_dir: Path, name: str) -> None:
    now = time.time()
    for tmp in models_dir.glob(f".{name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _ensure_folder(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """Make `target` with `write(tmp)` unless it is complete; atomic against crashes and races.

    The build goes to a temporary folder beside the target and is renamed into place, so a
    crash or two processes building at once never leave a half-written model: the loser of a
    race simply discards its copy.
    """
    if _is_complete(target, marker):
        return target
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(models_dir, target.name)
    if target.exists() and not _is_complete(
        target, marker
    ):  # re-check: another process may just have finished
        # Present but incomplete: left by something other than a build (e.g. an interrupted copy).
        shutil.rmtree(target, ignore_errors=True)
    tmp = models_dir / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its build into place first; theirs is as good as ours.
            if not _is_complete(target, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_demo_pipeline(folder: Path) -> None:
    build_demo_pipeline().save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; the vocab/merges pair lets older
    # transformers (slow CLIPTokenizer) load the folder too.
    write_clip_tokenizer_files(folder / "tokenizer")


def _write_demo_controlnet(folder: Path) -> None:
    net = build_demo_controlnet()
    if net is None:
        raise FileNotFoundError(f"the demo model's weights file {DEMO_WEIGHTS_FILE} holds no ControlNet")
    net.save_pretrained(folder, safe_serialization=True)


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model's diffusers folder, unpacking it from `DEMO_WEIGHTS_FILE` on first use."""
    return _ensure_folder(demo_model_dir(cache_dir), "model_index.json", _write_demo_pipeline)


def ensure_demo_controlnet(cache_dir: Path | None = None) -> Path:
    """Return the demo model's edge ControlNet folder, unpacking it on first use."""
    return _ensure_folder(demo_controlnet_dir(cache_dir), "config.json", _write_demo_controlnet)
