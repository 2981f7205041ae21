"""Train an edge ControlNet for the demo model, on CPU.

The control images are made by the engine's own code: every object of a training sample becomes
a layer (its RGBA exactly as drawn) and `core.control.control_image` turns the stack into the
Canny map the engine feeds the ControlNet at generation time (outlines, inner edges, occlusion),
so training and use see the same kind of map.

A `ControlNetModel` is copied from the base model's U-Net encoder (`ControlNetModel.from_unet`,
zero-initialised output convolutions); the U-Net, VAE and text encoder stay frozen. Loss: the
usual epsilon-prediction DDPM loss of the U-Net with the ControlNet's residuals added, with 30 %
empty captions (the ControlNet paper drops half of them) so that the edges alone carry the layout.
An EMA of the weights is saved as a diffusers folder ``<run>/controlnet``.

Like `training.train`, everything random derives from ``--seed`` and the step number;
``--minutes`` ends early (the log says after how many steps), checkpoints resume.

    python -m training.train_controlnet --base training/runs/demo-v3/pipeline \\
        --latents training/runs/demo-v3/latents-20000.pt --run training/runs/controlnet-v1 --minutes 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

from core.collage import Collage, Layer
from core.control import control_image
from core.demo_model import CLIP_MAX_LENGTH
from training.data import make_sample
from training.train import LossLog, log, optimise, save_checkpoint

# Channels of the conditioning embedding: three stride-2 steps take the 64x64 control image to
# the 8x8 latent grid (SD's ControlNets use (16, 32, 96, 256) for the same factor 8).
CONDITIONING_CHANNELS = (16, 32, 64, 64)


def sample_control_map(seed: int, index: int) -> np.ndarray:
    """The engine's control image (H, W) uint8 of training sample `index`: each object a layer."""
    s = make_sample(seed, index)
    h, w = s.image.shape[:2]
    layers = [
        Layer(text=o.text, image=rgba, control_weight=1.0)
        for o, rgba in zip(s.objects, s.layers, strict=True)
    ]
    collage = Collage(prompt=s.caption, layers=layers, width=w, height=h)
    return control_image(collage)[..., 0]


def control_maps(run: Path, seed: int, n: int) -> torch.Tensor:
    """(n, H, W) uint8 control maps of the first n samples, cached in the run folder."""
    cache = run / f"controls-{n}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    maps = torch.from_numpy(np.stack([sample_control_map(seed, i) for i in range(n)]))
    torch.save(maps, cache)
    log(run, f"made {n} control maps")
    return maps


class ControlNetTrainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run = Path(args.run)
        self.run.mkdir(parents=True, exist_ok=True)
        pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None)
        self.unet = pipe.unet.requires_grad_(False).eval()
        self.text = pipe.text_encoder.requires_grad_(False).eval()
        self.tokenizer = pipe.tokenizer
        self.scaling = float(pipe.vae.config.scaling_factor)
        self.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        torch.manual_seed(args.seed)
        self.net = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS
        )
        self.ema = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS
        )
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=args.lr, weight_decay=0.0)
        self.state = {"step": 0, "base": str(args.base), "losses": []}
        self.ckpt = self.run / "checkpoint.pt"
        if self.ckpt.exists() and not args.restart:
            ck = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            self.state = {**ck["state"], "base": str(args.base)}
            self.net.load_state_dict(ck["net"])
            self.ema.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["opt"])
            log(self.run, f"resumed at step {self.state['step']} on base {args.base}")

    def _save(self) -> None:
        parts = {"net": self.net, "ema": self.ema, "opt": self.opt}
        save_checkpoint(self.ckpt, {"state": self.state, **{k: v.state_dict() for k, v in parts.items()}})

    def train(self) -> None:
        a = self.args
        lat = torch.load(a.latents, weights_only=False)
        mean, std, ids = lat["mean"], lat["std"], lat["ids"]
        maps = control_maps(self.run, a.seed, len(mean))
        with torch.no_grad():
            empty = self.tokenizer(
                "", padding="max_length", max_length=CLIP_MAX_LENGTH, return_tensors="pt"
            ).input_ids[0]
        deadline = time.monotonic() + a.minutes * 60
        losses = LossLog(self.run, "controlnet", self.state["losses"], a.ckpt_minutes, self._save)
        self.net.train()
        params = list(self.net.parameters())
        pairs = list(zip(self.ema.parameters(), params, strict=True))
        while self.state["step"] < a.steps and time.monotonic() < deadline:
            step = self.state["step"]
            rng = np.random.default_rng([a.seed, 4, step])
            idx = torch.from_numpy(rng.integers(0, len(mean), a.batch))
            gen = torch.Generator().manual_seed(a.seed * 1299709 + step)
            z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * self.scaling
            cond_image = maps[idx].float().div(255.0)[:, None].expand(-1, 3, -1, -1)
            if rng.random() < 0.5:  # flip image and edges together
                z, cond_image = z.flip(-1), cond_image.flip(-1)
            tok = ids[idx].clone()
            tok[torch.from_numpy(rng.random(a.batch) < a.uncond_p)] = empty
            noise = torch.randn(z.shape, generator=gen)
            t = torch.randint(0, 1000, (a.batch,), generator=gen)
            noisy = self.noise_sched.add_noise(z, noise, t)
            with torch.no_grad():
                text = self.text(tok).last_hidden_state
            down, mid = self.net(
                noisy, t, encoder_hidden_states=text, controlnet_cond=cond_image, return_dict=False
            )
            pred = self.unet(
                noisy,
                t,
                encoder_hidden_states=text,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
            loss = F.mse_loss(pred, noise)
            lr = a.lr * min(1.0, (step + 1) / a.warmup)
            optimise(self.opt, loss, params, lr, pairs, min(a.ema, (1 + step) / (10 + step)))
            self.state["step"] = step + 1
            losses.step(step, loss.item(), lr)
        losses.done(self.state["step"])

    def save(self) -> Path:
        out = self.run / "controlnet"
        self.ema.save_pretrained(out, safe_serialization=True)
        info = {k: v for k, v in self.state.items() if k != "losses"}
        info["args"] = dict(vars(self.args))
        (self.run / "training.json").write_text(json.dumps(info, indent=2))
        log(self.run, f"saved controlnet to {out}")
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the trained demo pipeline folder (frozen)")
    p.add_argument("--latents", required=True, help="the base run's latent cache (latents-N.pt)")
    p.add_argument("--run", default="training/runs/controlnet-v1", help="output folder")
    p.add_argument("--seed", type=int, default=20240521, help="must be the base run's data seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=10**9)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--uncond-p", type=float, default=0.3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    trainer = ControlNetTrainer(args)
    trainer.train()
    return trainer.save()


if __name__ == "__main__":
    main(sys.argv[1:])
