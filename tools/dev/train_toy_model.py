"""Dev tool: train the tiny SD-family model of the toy shapes world and write it as a diffusers folder.

Runs in the dev venv of requirements-dev.txt (torch + diffusers + transformers), never in the product:

    nice -n 5 .venv-dev/bin/python -m tools.dev.train_toy_model --out models/tiny-sd

Stages, each checkpointed under --work so an interrupted run resumes:
  1. image pools from the generator (the base-model pool excludes the held-out triples; the
     autoencoder also sees those, as SD's VAE has seen everything),
  2. AutoencoderKL (8x down, 4x16x16 latents),
  3. latents of the base pool and of an outlined-style pool (training triples drawn hollow, captions
     naming the style), scale factor = 1 / latent std of the base pool,
  4. the CLIP-style text encoder, pretrained on captions alone and then frozen (--text-encoder probe),
     and the UNet2DConditionModel (eps prediction, SD scaled-linear schedule, offset noise, 10% empty
     captions for classifier-free guidance), EMA weights exported; beside this stage a second process
     sharpens the autoencoder's decoder with its encoder frozen (--decoder-steps),
  5. fp16 diffusers folder with the real CLIP tokenizer files.

Each stage ends at its step count; the clock only caps it (--*-minutes) on a slow or busy machine.
The defaults train a model from scratch in 41 min on 2 CPU cores: image pools 0.3 min; VAE 7 min on 2
threads (1500 steps); latents 1 min; then, side by side on one thread each, the text encoder probe
(800 steps, 2 min) and UNet, and the decoder fine-tune (1200 steps, 15 min); the UNet takes both
threads once the decoder is done (7000 steps, 31 min in all). models/tiny-sd is `--seed 1`.

Two runs, check_toy_model.py (shape / foreground / background; 72, 37, 21 and 21 samples), then TI with
the shipped configs judged by evaluate_ti on 64 samples (TI seeds 42 / 7):
  --seed 1 (41.4 min): held-out triples 96 / 100 / 100, trained 100 / 97 / 95, purple stars
    100 / 100 / 100, with no background 100 / 100 / 100. Object after 100 steps: 16% / 34% purple
    stars (the stars came in other colours); after 300: 89% / 89%, initializer 2%, edited prompt
    100% / 72%. Style, 100 steps: 66% outlined vs 0%, edited prompt 98% outlined (2% yellow on blue).
  --seed 0 (45.2 min, with --probe-steps 1500 --decoder-steps 1600): held-out 100 / 99 / 100, trained
    97 / 89 / 92, purple stars 95 / 95 / 95, with no background 62 / 95 / 86. Object after 100 steps:
    81% / 75%, edited prompt 0% / 2% (stars in blue and green on yellow); after 300: 89% / 89%, edited
    5% / 42%; with --num_vectors 2, 100 steps: 78% / 81%, edited 100% / 100%. Style: 34% vs 0%.
So both runs render the world; one-vector TI stays editable on one of them. Its autoencoder's
reconstructions of outlined images were judged right in 59% / 68% (seed 0 / 1), 76% / 87% after the
decoder fine-tune (held-out filled images: 99-100%).

This recipe differs from the one before in UNet heads of width 32 (1, 2, 4 heads; before: 4 heads, of
width 8 at the top level, 25% slower per step), 7000 UNet steps (6000), and step counts instead of the
clock ending the VAE and decoder stages. The one before learnt shapes in one run and not in another:
held-out shapes 90% and 62% (a from-scratch run, 53.7 min, object TI 0%); on the first one's
autoencoder, with the captions' "in" removed, 90% / 97% / 96%, object TI 84% / 78% (edited 100% /
36%), style 55% vs 2%. An earlier run, trained on the style phrase " in outline", read any "in" after
a scene as outlined: TI's style initializer "a painting in the style of drawing" drew 88% outlines,
hence toy_world.STYLE_PHRASES and FILL_PHRASES. TI's scatter between runs and between 16-sample
evaluations is about 20 points: judge a candidate with 64 samples and more than one TI seed.

The earlier shipped model predates the probe text encoder: it was trained in four legs with
--text-encoder joint --loss-weight x0, the recipe growing between them: steps 1-4788 on the base
pool alone without offset noise; resumed with offset noise and the style pool to --unet-steps 9500;
resumed with the filled-caption tails (toy_world.FILL_PHRASES) to --unet-steps 11500 --lr 3e-3. The
world then changed from freely rotated shapes to upright ones (toy_world.TILT), and the last leg
fine-tuned that model on it: a fresh --work folder holding the old vae and vae_decoder_ft, --init
<old work>/unet_ckpt.pt --unet-minutes 95 --threads 2 (17,125 steps). About 3.5 CPU hours in all.

Before that last leg its samples had the right colours but blob-like shapes (the judge named 24-28%
of shapes right). The latents were not the cause (decoding real latents with noise of std 0.3 kept
97% of shapes), nor the sampler (DPM++ ODE, SDE and Euler-a all 25-35%), nor the loss weighting
(--loss-weight min-snr, 3000 steps: 35%), nor width alone (--unet-channels 64,128,128 from scratch,
3200 steps: blobs). Free rotation was: a shape at a given place and size was a ring of equally
likely outlines whose average is a round blob. Upright, the same UNet went to 81% held-out shapes
within 7400 fine-tuning steps.

From scratch on the upright world, with the earlier model's autoencoder: held-out shapes /
foregrounds / backgrounds (check_toy_model.py, 72 samples, 48 in the first row), batch 32, decoded by
the autoencoder before its decoder fine-tune unless said:
  joint, x0, lr 1e-3, 3000 steps, 17 min on 2 threads:                  19% / 88% / 92%
  joint, x0, lr 2e-3, 5075 steps, 50 min on 1 thread beside another run: 8% / 75% / 88%
  the same at batch 16, 8500 steps:                                     11% / 81% / 88%
  joint, x0, lr 1e-3, 9750 steps, 65 min on 2 threads:                  17% / 85% / 82%
    the same through the fine-tuned decoder:                            29% / 92% / 96%
  probe, min-snr, lr 1e-3, 6000 steps, 52 min on 1 thread beside another run:
                                                                        62% / 79% / 79%
    the same through the fine-tuned decoder:                            82% / 92% / 93%
  probe, min-snr, lr 1e-3, 4000 steps, 22 min on 2 threads (0.33 s/step), fine-tuned decoder:
                                                                        36% / 89% / 96%
  probe, min-snr, batch 16, 5500 steps, 26 min on 1 thread beside another run, fine-tuned decoder,
    lr 1e-3 / 2e-3 / 3e-3 / 4e-3:                36% / 68% / 38% / 57% shapes, 79-81% fg, 89-94% bg
The joint runs' UNets did not read the shape word: swapping it for another shape in a training
caption raised the 9750-step EMA UNet's eps error at t = 100 / 300 / 500 by 4 / 6 / 10% (swapping
the foreground colour: 147 / 157 / 167%; the earlier model, shape: 115 / 182 / 179%). Their text
encoder carried that word no more strongly than at random init: changing it moved the context by
0.10 of its norm (the background word: 0.82; in the earlier model's encoder 0.42 and 0.68). A text encoder
frozen at random init, or joint with min-snr, left the shape gap at +1% after 3000 steps. The probe
encoder (0.69 for the shape word, 3 min) let the UNet read it: +8-10% at 2600 steps, +37-51% at
5200 (the 4000-step run: +10-11% at its end, so shapes come late and need the whole 6000; half
the samples, at batch 16, are not enough either at any of four learning rates). The
fine-tuned decoder matters as much at the end: same latents, 62% -> 82% shapes. Neither bf16
autocast nor torch.compile made the step cheaper (batch 32, 2 threads, joint encoder): 0.52 and
0.33 vs 0.37 and 0.35 s.

Why purple stars are in the base pool: held out, as they were until the model above, the recipe's
models composed the unseen (purple, star) pair too weakly for TI. TI's prompt "a photo of <my-shape>"
names no background. Asked for "a photo of a purple star" without one, such a model drew it right
in 57% of 21 samples (the earlier model 76%), mostly on a purple or blue background. TI reached
12% with 1 vector after 100 steps, 38% after 400 and 44-50% with 2-3 vectors after 400 steps. It drew
94-100% purple stars where the prompt named a background. Three retrains did not make the pair firm
(6000 steps each, the same autoencoder). Probe encoder with --loss-weight x0: held-out shapes 32%,
no purple stars, TI 0%. The same with 1/snr capped at 5: 76%, no purple stars. More background-less
captions: purple stars drawn as squares, 10%, TI 19-25%. Trained on purple stars under their own
words, as SD has seen cat toys, the model renders the concept. TI's prompt and initializer name
neither its colour nor its shape, so TI still has to find it from the images alone.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from data import toy_world as tw
from ldm.tokenizer import bpe_vocab_and_merges, load_tokenizer
from tools import ROOT


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ---------------------------------------------------------------- tokenizer

def save_tokenizer_files(folder):
    """vocab.json + merges.txt + configs, the slow-tokenizer file set every loader understands
    (transformers 5 itself would only write tokenizer.json)."""
    os.makedirs(folder, exist_ok=True)
    vocab, merges = bpe_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                   "do_lower_case": True, "clean_up_tokenization_spaces": True}, f, indent=2)


# ---------------------------------------------------------------- models

def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=128, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), layers_per_block=1)


TEXT_WIDTH = 64


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=TEXT_WIDTH,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg)


HEAD_WIDTH = 32


def make_unet(channels):
    from diffusers import UNet2DConditionModel

    # attention_head_dim is diffusers' (SD1-legacy) name for the number of heads per level; heads of a
    # constant width are CompVis' num_head_channels (SD2: 64). On 2 CPU threads a step of batch 32
    # takes 0.21 s with 32-wide heads, 0.28 s with 4 heads of 8 at the top level (attention kernels
    # are slow on narrow heads).
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=tuple(c // HEAD_WIDTH for c in channels), use_linear_projection=False,
        norm_num_groups=32)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                         steps_offset=1)


class Budget:
    """Training progress in [0, 1] from steps or wall time, whichever runs out first: the machine is
    shared, so a fixed step count could overrun the time the project has. Drives a warmup + cosine lr."""

    def __init__(self, steps, minutes, start_step=0, used_seconds=0.0):
        self.steps, self.seconds = steps, minutes * 60.0
        self.t0 = time.time() - used_seconds
        self.step = start_step

    def elapsed(self):
        return time.time() - self.t0

    def progress(self):
        return max(self.step / self.steps, self.elapsed() / self.seconds)

    def lr_factor(self, warmup=0.03):
        p = self.progress()
        return float(min(1.0, p / warmup) * 0.5 * (1 + np.cos(np.pi * min(p, 1.0))) + 1e-3)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- stages

def image_pools(work, n_base, n_extra):
    path = os.path.join(work, "images.npz")
    if os.path.exists(path):
        z = np.load(path, allow_pickle=True)
        return z["base"], list(z["scenes"]), z["extra"]
    t = time.time()
    rng = random.Random(0)
    combos = tw.training_combos()
    scenes = [tw.random_scene(rng, combos) for _ in range(n_base)]
    base = np.stack([tw.render(s) for s in scenes])
    # Autoencoder-only images: held-out triples and outlined shapes, which the base pool lacks.
    held = tw.heldout_combos()
    extra_sc = [tw.random_scene(rng, held) for _ in range(n_extra // 2)]
    extra_sc += [tw.random_scene(rng, None, tw.STYLE) for _ in range(n_extra - n_extra // 2)]
    extra = np.stack([tw.render(s) for s in extra_sc])
    np.savez(path, base=base, scenes=np.array(scenes, dtype=object), extra=extra)
    log(f"image pools: {len(base)} base + {len(extra)} autoencoder-only in {time.time() - t:.0f}s")
    return base, scenes, extra


def to_tensor(u8):
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def random_crops(u8, size, g):
    n, h, w, _ = u8.shape
    ys, xs = g.integers(0, h - size + 1, n), g.integers(0, w - size + 1, n)
    return np.stack([im[y:y + size, x:x + size] for im, y, x in zip(u8, ys, xs)])


def load_vae(path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path) if os.path.exists(os.path.join(path, "config.json")) else None


def train_vae(work, images, steps, minutes, batch, seed):
    path = os.path.join(work, "vae")
    vae = load_vae(os.path.join(work, "vae_decoder_ft")) or load_vae(path)
    if vae is not None:
        return vae
    torch.manual_seed(seed)
    vae = make_vae()
    log(f"VAE params {n_params(vae) / 1e6:.2f}M")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    budget = Budget(steps, minutes)
    g = np.random.default_rng((seed, 1))
    step = 0
    while budget.progress() < 1.0:
        step = budget.step = step + 1
        for group in opt.param_groups:
            group["lr"] = 1e-3 * budget.lr_factor(0.05)
        # Mostly 64 px crops (4x cheaper, the autoencoder is convolutional), then full frames so
        # the mid-block attention settles on the 16x16 latent grid it will decode.
        full = budget.progress() > 0.75
        pick = images[g.integers(0, len(images), batch if full else 2 * batch)]
        x = to_tensor(pick if full else random_crops(pick, 64, g))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 keeps flat colours and edges sharp; the KL term only keeps the latent scale sane.
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            log(f"vae step {step} progress {budget.progress():.2f} loss {loss.item():.4f} kl {kl.item():.2f} "
                f"{budget.elapsed() / step:.2f}s/step")
    vae.save_pretrained(path)
    check_vae(vae, images[-200:], os.path.join(work, "vae_recon.png"))
    return vae


def finetune_decoder(work, images, steps, minutes, batch, seed):
    """More decoder training with the encoder frozen: the latents the UNet learned stay valid, only
    their decoding sharpens (what SD's ft-MSE VAE did). Runs in a second process beside the UNet stage."""
    vae = load_vae(os.path.join(work, "vae"))
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    # The frozen encoder's posteriors, once: per step it would cost as much as the decoder itself.
    mean, std = posteriors(vae, images)
    budget = Budget(steps, minutes)
    g = np.random.default_rng((seed, 5))
    torch.manual_seed(seed + 5)
    step = 0
    while budget.progress() < 1.0:
        step = budget.step = step + 1
        for group in opt.param_groups:
            group["lr"] = 5e-4 * budget.lr_factor(0.02)
        # As in train_vae: 64 px crops (8x8 latents cut from full-frame ones, so the encoder saw the
        # whole image) at 4x the samples per second, full frames at the end.
        full = budget.progress() > 0.75
        idx = g.integers(0, len(images), batch if full else 4 * batch)
        x = to_tensor(images[idx])
        z = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        if not full:
            ys, xs = g.integers(0, 9, len(x)), g.integers(0, 9, len(x))
            z = torch.stack([zi[:, y:y + 8, x_:x_ + 8] for zi, y, x_ in zip(z, ys, xs)])
            x = torch.stack([xi[:, 8 * y:8 * y + 64, 8 * x_:8 * x_ + 64] for xi, y, x_ in zip(x, ys, xs)])
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log(f"decoder step {step} progress {budget.progress():.2f} loss {loss.item():.4f}")
    vae.save_pretrained(os.path.join(work, "vae_decoder_ft"))
    check_vae(vae, images[-200:], os.path.join(work, "vae_decoder_ft_recon.png"))


@torch.no_grad()
def check_vae(vae, images, png):
    """Judge accuracy on reconstructions: the upper bound for anything the UNet samples."""
    vae.eval()
    rec = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    ok = [verdict(tw.judge(r)) == verdict(tw.judge(i)) for r, i in zip(rec, images)]
    log(f"VAE reconstructions judged like their originals: {np.mean(ok):.3f} (of {len(ok)})")
    from PIL import Image

    Image.fromarray(np.concatenate([np.concatenate(list(images[:8]), 1), np.concatenate(list(rec[:8]), 1)])).save(png)


def verdict(v):
    return (v.shape, v.fg, v.bg, v.style)


@torch.no_grad()
def posteriors(vae, images, batch=64):
    """Posterior means and standard deviations of uint8 images, encoded in batches."""
    vae.eval()
    post = [vae.encode(to_tensor(images[i:i + batch])).latent_dist for i in range(0, len(images), batch)]
    return torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])


def latent_means(vae, images):
    return posteriors(vae, images)[0].numpy()


def encode_latents(work, vae, images):
    path = os.path.join(work, "latents.npy")
    if os.path.exists(path):
        return np.load(path)
    t = time.time()
    lat = latent_means(vae, images)
    np.save(path, lat)
    log(f"latents {lat.shape} in {time.time() - t:.0f}s, std {lat.std():.3f}")
    return lat


def style_pool(work, vae, n):
    """Latents and scenes of n training triples drawn in the outlined style."""
    path = os.path.join(work, "style.npz")
    if os.path.exists(path):
        z = np.load(path, allow_pickle=True)
        return z["latents"], list(z["scenes"])
    rng = random.Random(7)
    scenes = [tw.random_scene(rng, tw.training_combos(), tw.STYLE) for _ in range(n)]
    lat = latent_means(vae, np.stack([tw.render(s) for s in scenes]))
    np.savez(path, latents=lat, scenes=np.array(scenes, dtype=object))
    log(f"style pool: {n} outlined latents")
    return lat, scenes


def pretrain_text_encoder(work, te, tok, steps, seed, batch=128, lr=1e-3):
    """Teach the text encoder, from captions alone, to state at every position after the caption what
    the caption says (shape, colours, style; linear probes), as SD gets a pretrained CLIP. Trained
    jointly with the UNet from random init, the encoder kept the shape word as faint as at init
    (nothing asked for it while the UNet could not yet use it), and the UNet never learnt to read it."""
    path = os.path.join(work, "text_encoder_probe.pt")
    if os.path.exists(path):
        te.load_state_dict(torch.load(path))
        return
    heads = torch.nn.ModuleList(torch.nn.Linear(TEXT_WIDTH, n) for n in
                                (1 + len(tw.SHAPES), 1 + len(tw.COLORS), 1 + len(tw.COLORS), 1 + 2))
    opt = torch.optim.AdamW(list(te.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    rng = random.Random(seed * 100 + 11)
    combos = tw.training_combos()  # held-out triples stay unseen, in text too
    budget = Budget(steps, float("inf"))
    for step in range(1, steps + 1):
        budget.step = step
        for group in opt.param_groups:
            group["lr"] = lr * budget.lr_factor(warmup=50 / steps)
        scenes = [tw.random_scene(rng, combos, tw.STYLE if rng.random() < 0.2 else "") for _ in range(batch)]
        caps = [tw.caption(sc, rng) if rng.random() >= 0.1 else "" for sc in scenes]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        labels = torch.tensor([tw.caption_fields(sc, c) for sc, c in zip(scenes, caps)])
        h = te(ids).last_hidden_state
        # Every position from the end-of-text token on has seen the whole caption (causal mask).
        after = torch.arange(77)[None] >= (ids == tok.eos_token_id).int().argmax(1, keepdim=True)
        losses = [F.cross_entropy(head(h[after]), labels[:, k, None].expand(-1, 77)[after])
                  for k, head in enumerate(heads)]
        opt.zero_grad(set_to_none=True)
        sum(losses).backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"text encoder step {step} probe losses " + " ".join(f"{x.item():.3f}" for x in losses))
    torch.save(te.state_dict(), path)


def train_unet(work, latents, scenes, scale, channels, steps, minutes, batch, lr, offset_noise, loss_weight,
               seed, init=None, text_encoder="joint", probe_steps=0, beside=None, threads=1):
    """beside: the decoder fine-tune's process, running on the other core; once it is done this stage
    takes all `threads`."""
    tok = load_tokenizer()
    torch.manual_seed(seed + 2)
    unet, te = make_unet(channels), make_text_encoder()
    if text_encoder == "probe":
        pretrain_text_encoder(work, te, tok, probe_steps, seed)
    frozen = text_encoder != "joint"
    log(f"UNet params {n_params(unet) / 1e6:.2f}M, text encoder {n_params(te) / 1e6:.2f}M")
    params = list(unet.parameters()) + list(te.parameters())
    ckpt = os.path.join(work, "unet_ckpt.pt")
    if init and not os.path.exists(ckpt):
        with torch.no_grad():
            for p, e in zip(params, torch.load(init, weights_only=False)["ema"]):
                p.copy_(e)
        log(f"initialised from the EMA weights of {init}")
    ema = [p.detach().clone() for p in params]
    te.requires_grad_(not frozen)
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0)
    start, used = 0, 0.0
    if os.path.exists(ckpt):
        st = torch.load(ckpt, weights_only=False)  # our own file; holds plain floats besides tensors
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        start, used = st["step"], st["seconds"]
        log(f"resumed at step {start}")
    # A frozen text encoder's EMA is the encoder itself; averaging it every step would be wasted work.
    averaged = [(e, p) for e, p in zip(ema, params) if p.requires_grad]
    noise_sched = make_scheduler()
    acp = noise_sched.alphas_cumprod
    lat = torch.from_numpy(latents) * scale
    g = np.random.default_rng((seed, 2 + start))
    rng = random.Random(seed * 100 + 3 + start)
    torch.manual_seed(seed * 100 + 4 + start)
    budget = Budget(steps, minutes, start, used)
    step = start
    while budget.progress() < 1.0:
        step = budget.step = step + 1
        if beside is not None and beside.poll() is not None:
            torch.set_num_threads(threads)
            beside = None
        for group in opt.param_groups:
            group["lr"] = lr * budget.lr_factor()
        idx = g.integers(0, len(lat), batch)
        # Fresh caption per visit so every template/phrasing is seen with every image.
        caps = ["" if rng.random() < 0.1 else tw.caption(scenes[i], rng) for i in idx]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        x0 = lat[idx]
        # SD's schedule leaves sqrt(abar_999) = 0.07 of x0 in x_T. In a world of flat backgrounds the
        # spatial mean of x_T then tells the background colour better than the caption does, and
        # the model learns to read it from the noise: at sampling time the seed, not the text, picks
        # the background. A per-channel constant in the noise ("offset noise") hides that leak.
        noise = torch.randn_like(x0) + offset_noise * torch.randn(batch, x0.shape[1], 1, 1)
        t = torch.from_numpy(g.integers(0, 1000, batch))
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = te(ids).last_hidden_state
        # Both weightings damp the easy low-noise steps like min-SNR-5. "x0" (the earlier model's)
        # also lifts the noisy steps: eps error is tiny there (x_t is nearly the noise), yet that is
        # where layout and colours, i.e. what the text decides, are made, so they weigh like an x0
        # error (1/snr, capped at 20).
        snr = a.view(-1) / (1 - a.view(-1))
        per = ((unet(xt, t, ctx).sample - noise) ** 2).mean(dim=(1, 2, 3))
        w = snr.clamp(max=5.0) / snr
        if loss_weight == "x0":
            w = torch.where(snr < 1, (1 / snr).clamp(max=20.0), w)
        loss = (per * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in averaged:
                e.lerp_(p.detach(), 1 - decay)
        if step % 25 == 0 or step == start + 1:
            log(f"unet step {step} progress {budget.progress():.3f} loss {loss.item():.4f} "
                f"{(budget.elapsed() - used) / (step - start):.2f}s/step")
        if step % 200 == 0 or budget.progress() >= 1.0:
            torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(),
                        "ema": ema, "step": step, "seconds": budget.elapsed()}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return unet, te, tok


def export(out, vae, unet, te, tok, scale):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=float(scale))
    # SD 1.5's own scheduler file (a PNDMScheduler; clip_sample false added below as the hub file has it), so
    # that every sampler built from it steps as it does on SD: DDIM/PLMS "leading", DPM-Solver++/UniPC "linspace"
    sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    sched_path = os.path.join(out, "scheduler", "scheduler_config.json")
    with open(sched_path) as f:
        sched_config = json.load(f)
    with open(sched_path, "w") as f:
        json.dump({**sched_config, "clip_sample": False}, f, indent=2)
    tok_dir = os.path.join(out, "tokenizer")
    save_tokenizer_files(tok_dir)
    # tokenizer.json from transformers 5 duplicates vocab/merges (2 MB); the slow files suffice.
    tj = os.path.join(tok_dir, "tokenizer.json")
    if os.path.exists(tj):
        os.remove(tj)
    log(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "tiny-sd"))
    ap.add_argument("--work", default=os.path.join(ROOT, "output", "tiny-sd-train"))
    ap.add_argument("--n-base", type=int, default=6000)
    ap.add_argument("--n-extra", type=int, default=1200)
    ap.add_argument("--n-latents", type=int, default=4000, help="base-pool images the UNet trains on")
    ap.add_argument("--n-style", type=int, default=1000, help="outlined-style images the UNet trains on")
    ap.add_argument("--seed", type=int, default=0, help="seeds every training stage (the image pools stay the same)")
    # Each stage ends at its step count; the minutes only cap it on a slow or busy machine (then the
    # run is no longer reproducible, as the learning-rate schedule follows the clock).
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-minutes", type=float, default=12.0)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--unet-channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=(32, 64, 128),
                    help="block_out_channels of the UNet's three levels")
    ap.add_argument("--unet-steps", type=int, default=7000)
    ap.add_argument("--unet-minutes", type=float, default=45.0)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--offset-noise", type=float, default=0.2)
    ap.add_argument("--loss-weight", choices=("x0", "min-snr"), default="min-snr",
                    help="per-timestep weight of the eps loss (see train_unet)")
    ap.add_argument("--init", help="a unet_ckpt.pt whose EMA weights start the UNet stage (fresh optimizer "
                    "and schedule), to fine-tune a trained model on a changed world")
    ap.add_argument("--text-encoder", choices=("joint", "frozen", "probe"), default="probe",
                    help="joint: trained with the UNet from random init; frozen: left at random init; "
                    "probe: pretrained on captions alone (see pretrain_text_encoder), then frozen")
    ap.add_argument("--probe-steps", type=int, default=800)
    ap.add_argument("--decoder-steps", type=int, default=1200,
                    help="decoder fine-tune (see finetune_decoder), run by a second process beside the text "
                    "encoder and UNet stages; 0 skips it")
    ap.add_argument("--decoder-minutes", type=float, default=20.0)
    ap.add_argument("--decoder-only", action="store_true", help=argparse.SUPPRESS)
    # The stages before the UNet's run alone on --threads. Then the decoder fine-tune and the text
    # encoder + UNet stages run side by side on one thread each, as two one-thread processes get more
    # done than one on two threads (UNet batch 32: 0.52 s/step each vs 0.33 s/step), and the UNet
    # takes --threads again when the decoder is done.
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    base, scenes, extra = image_pools(a.work, a.n_base, a.n_extra)
    if a.decoder_only:
        finetune_decoder(a.work, np.concatenate([base, extra]), a.decoder_steps, a.decoder_minutes, a.vae_batch,
                         a.seed)
        return
    vae = train_vae(a.work, np.concatenate([base, extra]), a.vae_steps, a.vae_minutes, a.vae_batch, a.seed)
    n = a.n_latents
    lat = encode_latents(a.work, vae, base[:n])
    scale = 1.0 / float(lat.std())
    style_lat, style_scenes = style_pool(a.work, vae, a.n_style)
    lat, scenes = np.concatenate([lat, style_lat]), scenes[:n] + style_scenes
    decoder = None
    if a.decoder_steps and load_vae(os.path.join(a.work, "vae_decoder_ft")) is None:
        decoder = subprocess.Popen([sys.executable, "-m", "tools.dev.train_toy_model", "--decoder-only",
                                    "--work", a.work, "--decoder-steps", str(a.decoder_steps), "--decoder-minutes",
                                    str(a.decoder_minutes), "--vae-batch", str(a.vae_batch), "--seed", str(a.seed),
                                    "--threads", "1"])
        torch.set_num_threads(1)
    try:
        unet, te, tok = train_unet(a.work, lat, scenes, scale, a.unet_channels, a.unet_steps, a.unet_minutes,
                                    a.unet_batch, a.lr, a.offset_noise, a.loss_weight, a.seed, a.init,
                                    a.text_encoder, a.probe_steps, decoder, a.threads)
        if decoder is not None and decoder.wait() != 0:
            sys.exit(f"the decoder fine-tune failed (exit {decoder.returncode}); run the same command again to redo it")
    finally:
        if decoder is not None and decoder.poll() is None:
            decoder.terminate()
    export(a.out, load_vae(os.path.join(a.work, "vae_decoder_ft")) or vae, unet, te, tok, scale)
    log(f"all stages in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
