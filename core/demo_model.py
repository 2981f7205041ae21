"""A built-in demo model: a tiny, randomly initialised Stable-Diffusion-shaped pipeline.

It needs no download and no GPU, so the whole engine (layers, attention control, inversion, the
Krita bridge) can be tried and tested anywhere. Its pictures are structured noise, not art: the
weights are random. The tokenizer, though, is the real CLIP tokenizer (built from the CLIP BPE
merges shipped in `core/assets`), so prompts split into exactly the tokens SD 1.x sees.

The shapes follow SD 1.x where the rest of the code depends on them: the VAE downsamples by 8
into 4 latent channels, the U-Net has self- (`attn1`) and cross-attention (`attn2`) at the full
latent resolution and at half of it, and the text encoder gives 77 tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .paths import cache_dir as default_cache_dir

DEMO_MODEL_ID = "demo"
# Bump when the recipe below changes: a new folder name makes every install rebuild.
DEMO_VERSION = "demo-v1"
DEMO_SEED = 20240521

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


def build_demo_pipeline() -> StableDiffusionPipeline:
    """Build the demo pipeline in memory with deterministic random weights."""
    # fork_rng: seeding for reproducible weights must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            # Like SD 1.x: attention at the higher resolutions, none in the lowest down block;
            # the mid block attends at the lowest resolution (here latent / 2).
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            # Four blocks = three downsamples = factor 8, like SD's VAE.
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=256,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_MAX_LENGTH,
                hidden_act="quick_gelu",
                projection_dim=32,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo model lives (whether or not it is built yet)."""
    return (cache_dir or default_cache_dir()) / "models" / DEMO_VERSION


def _is_complete(folder: Path) -> bool:
    # The folder only appears by renaming a finished build into place, so a model_index.json in
    # it means a complete model (its absence: something else left a partial folder there).
    return (folder / "model_index.json").is_file()


def _remove_stale_builds(models_dir: Path) -> None:
    now = time.time()
    for tmp in models_dir.glob(f".{DEMO_VERSION}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model's diffusers folder, building it on first use.

    The build goes to a temporary folder beside the target and is renamed into place, so a
    crash or two processes building at once never leave a half-written model: the loser of a
    race simply discards its copy.
    """
    target = demo_model_dir(cache_dir)
    if _is_complete(target):
        return target

    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(models_dir)
    if target.exists() and not _is_complete(target):  # re-check: another process may just have finished
        # Present but incomplete: left by something other than a build (e.g. an interrupted copy).
        shutil.rmtree(target, ignore_errors=True)

    tmp = models_dir / f".{DEMO_VERSION}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build_demo_pipeline().save_pretrained(tmp, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; the vocab/merges pair lets older
        # transformers (slow CLIPTokenizer) load the folder too.
        write_clip_tokenizer_files(tmp / "tokenizer")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its build into place first; theirs is as good as ours.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
