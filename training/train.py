"""Train the demo model: a tiny Stable-Diffusion-shaped latent text-to-image model, on CPU.

(One file past ~500 lines on purpose: the three stages of one run share its data, settings and
checkpoints, and the recipe reads best top to bottom, as docs/demo_model.md describes it.)

Two stages, one run:

1. **VAE** – an `AutoencoderKL` (factor 8, 4 latent channels, like SD's) learns to reconstruct
   the synthetic images of `training.data` (trained on random crops: it is convolutional).
2. **U-Net + text encoder** – the training images are encoded once to latent distributions; a
   `UNet2DConditionModel` (cross-attention at two resolutions) and a `CLIPTextModel` trained from
   scratch (real CLIP tokenizer and vocabulary) learn the standard epsilon-prediction DDPM loss,
   with 10 % empty captions for classifier-free guidance and an EMA of the weights.

3. **Decoder** – the VAE decoder alone is fine-tuned on full-size images (the encoder, and so
   the latents the U-Net learnt, stay fixed), with an image-gradient loss against blur.

At the end the EMA weights are saved as a diffusers `StableDiffusionPipeline` folder (safetensors)
in ``<run>/pipeline``, which `core.models.load_pipeline` loads like any SD 1.x folder.

Everything random derives from ``--seed`` and the step number (batches, noise, timesteps), so a
run with the same step counts gives the same weights on the same software; ``--*-minutes`` stop a
stage early (and say how many steps ran) to fit a time budget. Checkpoints go to
``<run>/checkpoint.pt`` every few minutes and at the end of each stage; running the same command
again resumes from it.

    python -m training.train --run training/runs/demo-v2 --vae-minutes 8 --unet-minutes 45
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from core.demo_model import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer, write_clip_tokenizer_files
from training.data import make_images

TEXT_HIDDEN = 32  # as the random demo model (tests check 32)
EOS_ID = 49407
# Word-piece ids for --insert-p: the long tail of the CLIP vocabulary, far from every caption word.
UNKNOWN_WORD_IDS = (20000, 49000)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamples: factor 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,  # replaced by the measured value after training
    )


#: The U-Net shapes: what differs from `UNET_COMMON`. "v1" is the shipped demo model's (the test
#: suite's mechanism tests count on it: 6 cross-attention layers, 5 at the latent resolution and 1
#: at half of it); "wide" is demo-v2's: wider, cross-attention in every block (7 layers).
UNET_SHAPES: dict[str, dict] = {
    "v1": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=4,
    ),
    "wide": dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=8,
    ),
}
UNET_COMMON = dict(
    sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=TEXT_HIDDEN, norm_num_groups=32
)


def build_unet(shape: str = "wide") -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_COMMON, **UNET_SHAPES[shape])


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=TEXT_HIDDEN * 4,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=TEXT_HIDDEN,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_scheduler() -> DDIMScheduler:
    """SD 1.x's scheduler settings (the pipeline's default sampler)."""
    return DDIMScheduler(
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


def insert_unknown_words(tok: torch.Tensor, rng: np.random.Generator, p: float) -> None:
    """Insert one random vocabulary token (a word the captions never use, so its embedding row is
    untrained) at a random place in a share ``p`` of the captions, in place.

    Textual inversion puts a new token next to a layer's words; a text encoder that never saw an
    unknown word may let it change the neighbouring words' meaning (a colour, a shape). Seeing
    random unknown words in training teaches it to read the caption around them unchanged."""
    for row in np.flatnonzero(rng.random(len(tok)) < p):
        eos = int((tok[row] == EOS_ID).nonzero()[0])
        if eos >= CLIP_MAX_LENGTH - 1:
            continue
        at = int(rng.integers(1, eos + 1))
        word = int(rng.integers(UNKNOWN_WORD_IDS[0], UNKNOWN_WORD_IDS[1]))
        tok[row, at + 1 :] = tok[row, at:-1].clone()
        tok[row, at] = word


def optimise(opt, loss: torch.Tensor, params: list, lr: float, ema_pairs: list, ema_decay: float) -> None:
    """One optimiser step at learning rate `lr` (gradients clipped to norm 1), then the EMA copies
    (`ema_pairs`: (ema parameter, parameter)) move towards the new weights."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        for pe, p in ema_pairs:
            pe.lerp_(p, 1 - ema_decay)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """torch.save through a temporary file: a crash mid-write never leaves a broken checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


class LossLog:
    """A training stage's smoothed loss (EMA of the batch losses), logged every 50 steps into the
    run's log and `losses`, and a checkpoint (`save`) every `ckpt_minutes`."""

    def __init__(self, run: Path, name: str, losses: list, ckpt_minutes: float, save) -> None:
        self.run, self.name, self.losses, self.save = run, name, losses, save
        self.every = ckpt_minutes * 60
        self.running: float | None = None
        self.last_save = time.monotonic()

    def step(self, step: int, loss: float, lr: float) -> None:
        self.running = loss if self.running is None else 0.98 * self.running + 0.02 * loss
        if step % 50 == 0:
            self.losses.append((step, self.running))
            log(self.run, f"{self.name} step {step} loss {loss:.4f} avg {self.running:.4f} lr {lr:.2e}")
        if time.monotonic() - self.last_save > self.every:
            self.save()
            self.last_save = time.monotonic()

    def done(self, steps: int) -> None:
        log(self.run, f"{self.name} done after {steps} steps (avg loss {self.running})")
        self.save()


def log(run: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(run / "train.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run = Path(args.run)
        self.run.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)  # model initialisation
        self.vae = build_vae()
        self.unet = build_unet(args.unet_shape)
        self.text = build_text_encoder()
        self.ema_unet = build_unet(args.unet_shape).requires_grad_(False)
        self.ema_text = build_text_encoder().requires_grad_(False)
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_text.load_state_dict(self.text.state_dict())
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text.parameters()), lr=args.lr, weight_decay=0.0
        )
        self.extra: dict = {}  # optional optimiser states of later stages
        self.state = {"vae_step": 0, "vae_done": False, "unet_step": 0, "scaling": None, "losses": []}
        self.ckpt = self.run / "checkpoint.pt"
        if self.ckpt.exists() and not args.restart:
            self._load()
        elif args.init_from:
            self._init_from(Path(args.init_from))

    # --- checkpoints ---
    def _save(self) -> None:
        parts = ("vae", "unet", "text", "ema_unet", "ema_text", "vae_opt", "opt")
        save_checkpoint(
            self.ckpt,
            {"state": self.state, **{k: getattr(self, k).state_dict() for k in parts}, **self.extra},
        )

    def _load(self) -> None:
        ck = torch.load(self.ckpt, map_location="cpu", weights_only=False)
        self.state = ck["state"]
        for name in ("vae", "unet", "text", "ema_unet", "ema_text", "vae_opt", "opt"):
            getattr(self, name).load_state_dict(ck[name])
        self.extra = {k: v for k, v in ck.items() if k == "decoder_opt"}
        log(self.run, f"resumed: vae step {self.state['vae_step']}, unet step {self.state['unet_step']}")

    def _init_from(self, path: Path) -> None:
        """Reuse a finished run's VAE (decoder included) and EMA text encoder; train a new U-Net.

        The VAE encoder is unchanged by the decoder stage, so the other run's latent cache and
        scaling factor stay valid and are reused too."""
        ck = torch.load(path, map_location="cpu", weights_only=False)
        self.vae.load_state_dict(ck["vae"])
        self.text.load_state_dict(ck["ema_text"])
        self.ema_text.load_state_dict(ck["ema_text"])
        old = ck["state"]
        self.state.update(
            vae_step=old["vae_step"],
            vae_done=True,
            scaling=old["scaling"],
            decoder_step=old.get("decoder_step", 0),
            init_from=str(path),
        )
        cache = path.parent / f"latents-{self.args.n_images}.pt"
        if cache.exists():
            shutil.copy(cache, self.run / cache.name)
        log(self.run, f"initialised VAE and text encoder from {path}")

    # --- stage 1: the VAE ---
    def train_vae(self) -> None:
        a = self.args
        if self.state["vae_done"]:
            return
        deadline = time.monotonic() + a.vae_minutes * 60
        last_ckpt = time.monotonic()
        self.vae.train()
        while self.state["vae_step"] < a.vae_steps and time.monotonic() < deadline:
            step = self.state["vae_step"]
            rng = np.random.default_rng([a.seed, 1, step])
            images, _ = make_images(a.seed, a.vae_batch, start=int(rng.integers(0, 10**9)))
            x = images_to_tensor(images)
            c = a.vae_crop
            if c < x.shape[-1]:
                oy, ox = rng.integers(0, x.shape[-1] - c + 1, 2)
                oy, ox = int(oy) // 8 * 8, int(ox) // 8 * 8  # keep the 8-pixel latent grid
                x = x[..., oy : oy + c, ox : ox + c]
            gen = torch.Generator().manual_seed(a.seed * 7919 + step)
            posterior = self.vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = self.vae.decode(z).sample
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            kl = posterior.kl().mean() / z[0].numel()
            loss = rec + a.vae_kl * kl
            lr = a.vae_lr * min(1.0, (step + 1) / 100)
            for g in self.vae_opt.param_groups:
                g["lr"] = lr
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.state["vae_step"] = step + 1
            if step % 25 == 0:
                log(self.run, f"vae step {step} rec {rec.item():.4f} kl {kl.item():.3f}")
            if time.monotonic() - last_ckpt > a.ckpt_minutes * 60:
                self._save()
                last_ckpt = time.monotonic()
        self.state["vae_done"] = True
        log(self.run, f"vae done after {self.state['vae_step']} steps")
        self._save()

    # --- stage 2: U-Net and text encoder ---
    @torch.no_grad()
    def encode_dataset(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent means/stds and caption token ids of the training set (cached on disk)."""
        a = self.args
        cache = self.run / f"latents-{a.n_images}.pt"
        if cache.exists():
            d = torch.load(cache, weights_only=False)
            return d["mean"], d["std"], d["ids"]
        self.vae.eval()
        tokenizer = build_clip_tokenizer()
        means, stds, captions = [], [], []
        for start in range(0, a.n_images, 256):
            n = min(256, a.n_images - start)
            images, caps = make_images(a.seed, n, start=start)
            post = self.vae.encode(images_to_tensor(images)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            captions += caps
        ids = tokenizer(
            captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        mean, std = torch.cat(means), torch.cat(stds)
        torch.save({"mean": mean, "std": std, "ids": ids}, cache)
        log(self.run, f"encoded {a.n_images} images")
        return mean, std, ids

    def train_unet(self) -> None:
        a = self.args
        mean, std, ids = self.encode_dataset()
        if self.state["scaling"] is None:
            g = torch.Generator().manual_seed(a.seed)
            sample = mean[:2048] + std[:2048] * torch.randn(mean[:2048].shape, generator=g)
            self.state["scaling"] = float(1.0 / sample.std())
            log(self.run, f"latent scaling factor {self.state['scaling']:.4f}")
        scaling = self.state["scaling"]
        empty = build_clip_tokenizer()(
            "", padding="max_length", max_length=CLIP_MAX_LENGTH, return_tensors="pt"
        ).input_ids[0]
        noise_sched = DDPMScheduler.from_config(build_scheduler().config)
        deadline = time.monotonic() + a.unet_minutes * 60
        losses = LossLog(self.run, "unet", self.state["losses"], a.ckpt_minutes, self._save)
        self.unet.train()
        self.text.train()
        params = list(self.unet.parameters()) + list(self.text.parameters())
        ema_pairs = list(zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True)) + list(
            zip(self.ema_text.parameters(), self.text.parameters(), strict=True)
        )
        while self.state["unet_step"] < a.unet_steps and time.monotonic() < deadline:
            step = self.state["unet_step"]
            rng = np.random.default_rng([a.seed, 2, step])
            idx = torch.from_numpy(rng.integers(0, len(mean), a.batch))
            gen = torch.Generator().manual_seed(a.seed * 104729 + step)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
            if rng.random() < 0.5:  # horizontal flip: captions name no left/right
                z = z.flip(-1)
            tok = ids[idx].clone()
            if a.insert_p > 0:
                insert_unknown_words(tok, rng, a.insert_p)
            drop = torch.from_numpy(rng.random(a.batch) < a.uncond_p)
            tok[drop] = empty
            noise = torch.randn(z.shape, generator=gen)
            t = torch.randint(0, 1000, (a.batch,), generator=gen)
            noisy = noise_sched.add_noise(z, noise, t)
            cond = self.text(tok).last_hidden_state
            pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred, noise)
            lr = a.lr * min(1.0, (step + 1) / a.warmup)
            optimise(self.opt, loss, params, lr, ema_pairs, min(a.ema, (1 + step) / (10 + step)))
            self.state["unet_step"] = step + 1
            losses.step(step, loss.item(), lr)
        losses.done(self.state["unet_step"])

    # --- stage 3: sharpen the decoder (the encoder, hence the latents, stay as they are) ---
    def train_decoder(self) -> None:
        """Fine-tune the VAE decoder on full-size images with the encoder frozen.

        The U-Net was trained on this encoder's latents, so only the decoder may change; a
        sharper decoder directly sharpens every generated image.
        """
        a = self.args
        step0 = self.state.setdefault("decoder_step", 0)
        if step0 >= a.decoder_steps or a.decoder_minutes <= 0:
            return
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        opt = torch.optim.AdamW(params, lr=a.decoder_lr, weight_decay=0.0)
        if "decoder_opt" in self.extra:
            opt.load_state_dict(self.extra["decoder_opt"])
        deadline = time.monotonic() + a.decoder_minutes * 60
        last_ckpt = time.monotonic()
        self.vae.train()
        while self.state["decoder_step"] < a.decoder_steps and time.monotonic() < deadline:
            step = self.state["decoder_step"]
            rng = np.random.default_rng([a.seed, 3, step])
            images, _ = make_images(a.seed, a.vae_batch, start=int(rng.integers(0, 10**9)))
            x = images_to_tensor(images)
            gen = torch.Generator().manual_seed(a.seed * 15485863 + step)
            with torch.no_grad():
                post = self.vae.encode(x).latent_dist
                z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            recon = self.vae.decode(z).sample
            # Pixel loss plus an image-gradient term: edges are what the blur loses.
            grad = F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(
                recon.diff(dim=-2), x.diff(dim=-2)
            )
            loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 0.5 * grad
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self.state["decoder_step"] = step + 1
            if step % 25 == 0:
                log(self.run, f"decoder step {step} loss {loss.item():.4f}")
            if time.monotonic() - last_ckpt > a.ckpt_minutes * 60:
                self.extra["decoder_opt"] = opt.state_dict()
                self._save()
                last_ckpt = time.monotonic()
        self.vae.eval()
        self.extra["decoder_opt"] = opt.state_dict()
        log(self.run, f"decoder done after {self.state['decoder_step']} steps")
        self._save()

    # --- output ---
    def save_pipeline(self, out: Path | None = None) -> Path:
        self.vae.register_to_config(scaling_factor=self.state["scaling"])
        pipe = StableDiffusionPipeline(
            vae=self.vae.eval(),
            text_encoder=self.ema_text.eval(),
            tokenizer=build_clip_tokenizer(),
            unet=self.ema_unet.eval(),
            scheduler=build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        snapshot = out is not None
        out = out or self.run / "pipeline"
        pipe.save_pretrained(out, safe_serialization=True)
        write_clip_tokenizer_files(out / "tokenizer")  # for older transformers (slow tokenizer)
        if snapshot:
            return out
        info = {k: v for k, v in self.state.items() if k != "losses"}
        info["args"] = {k: v for k, v in vars(self.args).items()}
        (self.run / "training.json").write_text(json.dumps(info, indent=2))
        log(self.run, f"saved pipeline to {out}")
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="training/runs/demo-v2", help="output folder")
    p.add_argument("--seed", type=int, default=20240521)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--snapshot", metavar="DIR", help="only write the checkpoint's current weights as a pipeline to DIR"
    )
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--vae-steps", type=int, default=10**9)
    p.add_argument("--vae-minutes", type=float, default=8.0)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32, help="train on random crops of this size")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--decoder-steps", type=int, default=10**9)
    p.add_argument("--decoder-minutes", type=float, default=6.0)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--n-images", type=int, default=20000, help="training set size for the U-Net")
    p.add_argument("--unet-shape", choices=tuple(UNET_SHAPES), default="wide")
    p.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from another run's VAE and (EMA) text encoder, with a fresh U-Net",
    )
    p.add_argument("--unet-steps", type=int, default=10**9)
    p.add_argument("--unet-minutes", type=float, default=45.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--uncond-p", type=float, default=0.1)
    p.add_argument(
        "--insert-p",
        type=float,
        default=0.0,
        help="share of captions that get one random unknown word inserted (robustness to inversion tokens)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    if args.snapshot:  # read-only: a look at a run in progress
        return trainer.save_pipeline(Path(args.snapshot))
    t0 = time.monotonic()
    trainer.train_vae()
    trainer.train_unet()
    trainer.train_decoder()
    out = trainer.save_pipeline()
    log(trainer.run, f"total {math.ceil(time.monotonic() - t0)} s this session")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
