"""Time one Textual Inversion train step: ours (MindSpore) against the same work in PyTorch.

    python -m tools.benchmark_train_step --model small --size 256 --batch 1 --mode 0 [--repeat 3]

The step is the training script's: `TextualInversionLoss` (text encoder with the placeholder vectors,
noising, UNet, MSE) under `ms.value_and_grad(loss_net, grad_position=0)`, i.e. the gradient w.r.t. the
`[N, D]` vectors only, every weight frozen; latents are given (the VAE is not part of the step).
Models have random weights: `tiny` (configs/tiny-inference.yaml), `small` (an SD-shaped UNet at 128
channels with the full 12-layer CLIP text encoder, defined below), `sd15`, `sd21`.

The baseline runs in a child process of an interpreter with torch (`--torch-python` or TORCH_PYTHON,
see tools/torch_baseline.py; without one, or with `--no-baseline`, only our side runs), on as many
threads as ours: diffusers `UNet2DConditionModel` + transformers `CLIPTextModel` built from the same
config, whose random weights are saved (diffusers names) and loaded into our cells through
`ldm.convert`, so both sides run identical weights on identical inputs. Its placeholder vectors are a
leaf tensor spliced into the token embeddings like ours, the only tensor that requires grad. A ratio
ours / theirs is printed only if both sides ran their matmul on the same number of threads and did the
same work: losses within LOSS_RTOL and gradients within GRAD_RTOL of the largest gradient entry.

Reported per side: median step time after warm-up, first-call time minus the median (graph compile,
kernel selection, first allocations), the forward alone (so backward / forward is visible), the UNet
part alone (the same loss from the text encoder's output, differentiated to it), peak RSS
of the timed steps (sampled every 5 ms) and of the whole process (loading and compiling included),
and achieved FLOP/s. FLOPs are counted analytically (`forward_flops`; its conv + linear part is
cross-checked against torch's FlopCounterMode on diffusers' forward, which does not see CPU attention).
A weight x activation product (conv, linear) costs its forward once more in backward (the input
gradient only: no weight gets a gradient), an activation x activation product (attention) twice more;
norms and elementwise ops are not counted. The machine's fp32 peak is measured in the same run (best of
a 2048^3 matmul in numpy, MindSpore and torch, each with the threads it ran on), so FLOP/s reads as a
fraction of it.
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import threading
import time

import numpy as np

from tools.torch_baseline import (add_arguments, machine_load, matmul_peak, run_child, set_torch_threads,
                                  thread_mismatch, torch_python)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_VECTORS = 2
CAPTION_IDS = [49406, 320, 1125, 539]  # <|startoftext|> a photo of, then the placeholder tokens
EOS = 49407
# `small`: SD 1.x's structure (3 attention levels, 2 res blocks, 8 heads, 768-wide context from the
# full 12-layer OpenAI CLIP text encoder) at 128 instead of 320 base channels and 3 levels instead of 4.
SMALL_UNET = dict(model_channels=128, channel_mult=(1, 2, 4), attention_resolutions=(1, 2, 4), num_res_blocks=2,
                  num_heads=8, context_dim=768)
# "same work": fp32 sums in a different order (im2col GEMMs vs oneDNN convolutions, other reductions)
# differ by ~1e-6 relative; a wrong weight, input or schedule differs by far more
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------- configs

def model_config(name):
    """Our `ModelConfig` for a benchmark model name."""
    import yaml
    from dataclasses import replace
    from ldm.models import ModelConfig, UNetConfig, load_model_config, model_config_from_dict

    if name == "tiny":
        # the scale factor is only a sampling concern; the placeholder stays until the toy model lands
        with open(os.path.join(ROOT, "configs", "tiny-inference.yaml"), encoding="utf-8") as f:
            return model_config_from_dict(yaml.safe_load(f.read().replace("SCALE_FACTOR", "1.0")), "tiny")
    if name == "small":
        return replace(ModelConfig(), unet=UNetConfig(**SMALL_UNET))
    return load_model_config(os.path.join(ROOT, "configs", {"sd15": "v1-inference.yaml",
                                                          "sd21": "v2-inference.yaml"}[name]))


def diffusers_configs(cfg):
    """(UNet2DConditionModel kwargs, CLIPTextConfig kwargs) of the same architecture as `cfg`."""
    u, t = cfg.unet, cfg.text_encoder
    channels = [u.model_channels * m for m in u.channel_mult]
    attn = [2 ** i in u.attention_resolutions for i in range(len(channels))]
    heads = u.num_heads if u.num_head_channels == -1 else [c // u.num_head_channels for c in channels]
    unet = dict(sample_size=cfg.image_size // 2 ** (len(cfg.vae.ch_mult) - 1), in_channels=u.in_channels,
                out_channels=u.out_channels, block_out_channels=channels,
                layers_per_block=u.num_res_blocks, norm_num_groups=u.norm_num_groups,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
                attention_head_dim=heads, cross_attention_dim=u.context_dim,
                transformer_layers_per_block=u.transformer_depth,
                use_linear_projection=u.use_linear_in_transformer, upcast_attention=u.use_linear_in_transformer)
    text = dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length, hidden_size=t.width,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                hidden_act="quick_gelu" if t.use_quick_gelu else "gelu", layer_norm_eps=t.epsilon)
    return unet, text


def forward_flops(cfg, batch, h, w):
    """`{"unet": (weight_flops, attention_flops), "text": (...)}` of one forward at latent size h x w.

    2 FLOPs per multiply-add; weight_flops: convs and linears; attention_flops: q k^T and p v.
    """
    u, t = cfg.unet, cfg.text_encoder
    L, D = t.context_length, t.width
    text_w = t.layers * (4 * 2 * L * D * D + 2 * 2 * L * D * t.intermediate_size)
    text_a = t.layers * 2 * 2 * L * L * D
    temb = 4 * u.model_channels
    weight, attn = 2 * (u.model_channels * temb + temb * temb), 0   # time embedding MLP

    def conv(cin, cout, hw, k=3):
        return 2 * hw * cin * cout * k * k

    def res(cin, cout, hw):
        skip = conv(cin, cout, hw, 1) if cin != cout else 0
        return conv(cin, cout, hw) + 2 * temb * cout + conv(cout, cout, hw) + skip

    def transformer(c, n):
        # per block: self-attention q k v out, cross-attention q out, k v of the context, GEGLU in, FF out
        per_block_w = (2 * n * c * c * 6 + 2 * 2 * L * u.context_dim * c + 2 * n * c * 8 * c
                       + 2 * n * 4 * c * c)
        per_block_a = 2 * 2 * n * n * c + 2 * 2 * n * L * c
        # proj_in and proj_out around the blocks
        return 2 * 2 * n * c * c + u.transformer_depth * per_block_w, u.transformer_depth * per_block_a

    hw = h * w
    mc = u.model_channels
    weight += conv(u.in_channels, mc, hw)
    ch, ds, skips = mc, 1, [mc]
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            weight += res(ch, mult * mc, hw)
            ch = mult * mc
            if ds in u.attention_resolutions:
                tw, ta = transformer(ch, hw)
                weight, attn = weight + tw, attn + ta
            skips.append(ch)
        if level != len(u.channel_mult) - 1:
            hw //= 4
            weight += conv(ch, ch, hw)
            skips.append(ch)
            ds *= 2
    tw, ta = transformer(ch, hw)
    weight, attn = weight + 2 * res(ch, ch, hw) + tw, attn + ta
    for level, mult in list(enumerate(u.channel_mult))[::-1]:
        for i in range(u.num_res_blocks + 1):
            weight += res(ch + skips.pop(), mult * mc, hw)
            ch = mult * mc
            if ds in u.attention_resolutions:
                tw, ta = transformer(ch, hw)
                weight, attn = weight + tw, attn + ta
            if level and i == u.num_res_blocks:
                hw *= 4
                weight += conv(ch, ch, hw)
                ds //= 2
    weight += conv(mc, u.out_channels, hw)
    return {"unet": (batch * weight, batch * attn), "text": (batch * text_w, batch * text_a)}


def step_flops(cfg, batch, h, w, parts=("unet", "text")):
    flops = forward_flops(cfg, batch, h, w)
    return sum(2 * flops[p][0] + 3 * flops[p][1] for p in parts)


def make_inputs(cfg, batch, size, seed=0):
    """The step's inputs as numpy arrays, identical on both sides."""
    rng = np.random.default_rng(seed)
    t = cfg.text_encoder
    pad = EOS if t.pad_token == "<|endoftext|>" else 0
    ids = CAPTION_IDS + [t.vocab_size + i for i in range(NUM_VECTORS)] + [EOS]
    ids = np.array([ids + [pad] * (t.context_length - len(ids))] * batch, np.int32)
    h = size // 8
    return dict(vectors=(0.02 * rng.standard_normal((NUM_VECTORS, t.width))).astype(np.float32),
                latents=rng.standard_normal((batch, cfg.unet.in_channels, h, h), dtype=np.float32),
                ids=ids, noise=rng.standard_normal((batch, cfg.unet.in_channels, h, h), dtype=np.float32),
                timesteps=rng.integers(0, cfg.timesteps, size=batch).astype(np.int32))


# ---------------------------------------------------------------------------------------------- measuring

class PeakRSS:
    """Peak resident set size of this process while the `with` block runs, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def process_peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_calls(fn, repeat, warmup):
    """(first-call seconds, median seconds of `repeat` calls after `warmup` more, peak RSS of those calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    with PeakRSS() as rss:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return first, statistics.median(times), rss.peak


def mindspore_matmul_peak():
    """`matmul_peak` of MindSpore's matmul in a graph, as the step's and the samplers' kernels run."""
    import mindspore as ms
    from mindspore import Tensor, ops

    @ms.jit
    def matmul(a, b):
        return ops.matmul(a, b)

    # oneDNN runs the kernels on the runtime pool (ONEDNN_VERBOSE: "threadpool, nthr:2" on 2 cores); the
    # frontend queue thread also takes CPU while a graph runs, but runs no kernel
    return matmul_peak(lambda a, b: matmul(a, b).asnumpy(), Tensor,
                       pool=lambda name: name.startswith(("ActorThread", "KernelThread")))


# ---------------------------------------------------------------------------------------------- torch side

def torch_side(spec_path, out_path):
    """Baseline in the torch venv: build, save the weights for ours, time the same step, write JSON."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    from torch.utils.flop_counter import FlopCounterMode

    result = {"torch_threads": set_torch_threads()}
    spec = json.load(open(spec_path))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    text = CLIPTextModel(CLIPTextConfig(**spec["text"])).eval()
    for p in list(unet.parameters()) + list(text.parameters()):
        p.requires_grad_(False)
    weights = spec["weights"]
    os.makedirs(weights, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, os.path.join(weights, "unet.safetensors"))
    save_file({(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
               for k, v in text.state_dict().items()}, os.path.join(weights, "text_encoder.safetensors"))

    inputs = {k: torch.from_numpy(v) for k, v in np.load(spec["inputs"]).items()}
    vocab = spec["text"]["vocab_size"]
    vectors = inputs["vectors"].clone().requires_grad_(True)
    embeddings = text.text_model.embeddings if hasattr(text, "text_model") else text.embeddings
    table = embeddings.token_embedding

    class PlaceholderEmbedding(torch.nn.Module):
        # ids >= vocab read the vector rows, the frozen table the others: as ldm's CLIPTextEmbeddings
        def forward(self, ids):
            is_extra = ids >= vocab
            rows = vectors[(ids - vocab).clamp(0, len(vectors) - 1)]
            return torch.where(is_extra[..., None], rows, table(torch.where(is_extra, 0, ids)))

    embeddings.token_embedding = PlaceholderEmbedding()
    alphas = np.asarray(spec["alphas_cumprod"])
    t = inputs["timesteps"].long()
    a = torch.from_numpy(np.sqrt(alphas).astype(np.float32))[t].reshape(-1, 1, 1, 1)
    s = torch.from_numpy(np.sqrt(1 - alphas).astype(np.float32))[t].reshape(-1, 1, 1, 1)
    ids = inputs["ids"].long()
    v_target = spec["parameterization"] == "v"

    def loss_fn(context=None):
        if context is None:
            context = text(ids).last_hidden_state
        noisy = a * inputs["latents"] + s * inputs["noise"]
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        target = a * inputs["noise"] - s * inputs["latents"] if v_target else inputs["noise"]
        return ((pred - target) ** 2).mean()

    def step():
        loss = loss_fn()
        result["loss"] = float(loss.detach())
        result["grad"] = torch.autograd.grad(loss, vectors)[0].numpy().tolist()

    def forward():
        with torch.no_grad():
            loss_fn()

    with FlopCounterMode(display=False) as counter:
        forward()
    # CPU SDPA is invisible to the counter: this is the conv + linear part
    result["counted_forward_flops"] = counter.get_total_flops()
    result["first"], result["median"], result["peak_rss"] = time_calls(step, spec["repeat"], spec["warmup"])
    if spec["profile"]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step()
        ops = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:spec["profile"]]
        result["profile"] = [[e.key, e.count, e.self_cpu_time_total / 1e3] for e in ops]
    result["forward"] = time_calls(forward, spec["repeat"], 0)[1]
    if spec["unet_part"]:
        with torch.no_grad():
            context = text(ids).last_hidden_state.requires_grad_(True)

        def unet_step():
            loss = loss_fn(context)
            result["unet_loss"] = float(loss.detach())
            torch.autograd.grad(loss, context)

        result["unet_part"] = time_calls(unet_step, spec["repeat"], spec["warmup"])[1]
    result["process_peak_rss"] = process_peak_rss()
    peak = matmul_peak(torch.mm, torch.from_numpy)
    result["matmul_peak"], result["threads"] = peak["flops"], peak["threads"]
    result["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                          "transformers": __import__("transformers").__version__}
    with open(out_path, "w") as f:
        json.dump(result, f)


def scratch_dir(work):
    """A temporary folder under `work`, which is created first: a scratch folder the user named may
    not exist yet."""
    if work:
        os.makedirs(work, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=work)


def run_baseline(args, python, threads, cfg, inputs_path, weights):
    unet, text = diffusers_configs(cfg)
    from ldm.schedule import make_alphas_cumprod

    spec = dict(unet=unet, text=text, weights=weights, inputs=inputs_path, repeat=args.repeat, warmup=args.warmup,
                unet_part=not args.no_unet_part, profile=args.profile,
                parameterization=cfg.parameterization,
                alphas_cumprod=make_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps).tolist())
    spec_path, out_path = os.path.join(weights, "spec.json"), os.path.join(weights, "torch_result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    run_child(python, ["-m", "tools.benchmark_train_step", "--torch-side", spec_path, out_path], threads)
    with open(out_path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- our side

def build_ours(cfg, weights):
    """`(unet, vae, text_encoder, alphas_cumprod)` frozen as `StableDiffusion` freezes them; UNet and text
    weights from the `weights` folder if given. The VAE (random weights) is not part of the step, as on
    the torch side: it only times the encode that the latent cache saves."""
    from ldm.checkpoint_io import load_state_dict
    from ldm.convert import load_into, text_from_openai, unet_from_diffusers
    from ldm.models import build_models
    from ldm.schedule import make_alphas_cumprod

    unet, vae, text = build_models(cfg)
    if weights:
        load_into(unet, unet_from_diffusers(load_state_dict(os.path.join(weights, "unet.safetensors"))), "unet",
                  weights)
        load_into(text, text_from_openai(load_state_dict(os.path.join(weights, "text_encoder.safetensors"))),
                  "text_encoder", weights)
    for cell in (unet, vae, text):
        cell.set_train(False)
        for p in cell.get_parameters():
            p.requires_grad = False
    return unet, vae, text, make_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps)


def profile_ours(step, top):
    """Op time of one `step()` by MindSpore op type (its CPU profiler): [(op, calls, ms)], largest first."""
    import csv
    import glob
    from collections import defaultdict
    from mindspore import Profiler

    with tempfile.TemporaryDirectory() as folder:
        profiler = Profiler(output_path=folder)
        step()
        profiler.stop()
        profiler.analyse()
        [table] = glob.glob(os.path.join(folder, "*", "FRAMEWORK", "cpu_op_detail_info_0.csv"))
        totals = defaultdict(lambda: [0, 0.0])
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                totals[row["op_type"]][0] += int(row["op_occurrences"])
                totals[row["op_type"]][1] += float(row["op_total_time(ms)"])
    return sorted(([op, calls, ms] for op, (calls, ms) in totals.items()), key=lambda r: -r[2])[:top]


def ours(args, cfg, inputs, weights):
    import mindspore as ms
    from mindspore import Tensor, nn

    from ldm.modules.conditioner import Conditioner
    from ldm.pipeline import VAEGraph
    from ldm.training.loss import TextualInversionLoss

    unet, vae, text, alphas_cumprod = build_ours(cfg, weights)
    if args.recompute:
        unet.enable_gradient_checkpointing()
    loss_net = TextualInversionLoss(unet, Conditioner([text]), alphas_cumprod, cfg.parameterization)
    grad_fn = ms.value_and_grad(loss_net, grad_position=0)
    call_args = [Tensor(inputs[k]) for k in ("vectors", "latents", "ids", "noise", "timesteps")]
    call_args.append(Tensor(1.0, ms.float32))
    result = {}

    def step():
        loss, grad = grad_fn(*call_args)
        # the gradient first: waiting on the loss (ready halfway) makes the rest of the step ~2x slower
        result["grad"] = grad.asnumpy().tolist()
        result["loss"] = float(loss.asnumpy())

    def forward():
        loss_net(*call_args).asnumpy()

    encoder = VAEGraph(vae, decode=False)
    images = Tensor(np.random.default_rng(1).uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype(np.float32))

    def vae_encode():
        encoder(images)[0].asnumpy()

    result["first"], result["median"], result["peak_rss"] = time_calls(step, args.repeat, args.warmup)
    if args.profile:
        result["profile"] = profile_ours(step, args.profile)
    _, result["forward"], _ = time_calls(forward, args.repeat, 0)
    _, result["vae_encode"], _ = time_calls(vae_encode, args.repeat, 1)
    if not args.no_unet_part:
        class GivenContext(nn.Cell):
            """The conditioner's stand-in: returns the context it is given, so the training loss
            differentiated at position 0 is the UNet part of the step alone."""

            def construct(self, input_ids, context, size_ids=None):
                return context, None

        unet_grad_fn = ms.value_and_grad(TextualInversionLoss(unet, GivenContext(), alphas_cumprod,
                                                              cfg.parameterization), grad_position=0)
        unet_args = [text(call_args[2], call_args[0])] + call_args[1:]

        def unet_step():
            loss, grad = unet_grad_fn(*unet_args)
            grad.asnumpy()
            result["unet_loss"] = float(loss.asnumpy())

        _, result["unet_part"], _ = time_calls(unet_step, args.repeat, args.warmup)
    result["process_peak_rss"] = process_peak_rss()
    return result


# ---------------------------------------------------------------------------------------------- report

def different_work(mine, theirs):
    """Why the two sides' steps were not the same work (losses or gradients beyond the tolerances), or None."""
    losses = [("loss", mine["loss"], theirs["loss"])]
    if "unet_loss" in mine and "unet_loss" in theirs:
        losses.append(("UNet part loss", mine["unet_loss"], theirs["unet_loss"]))
    for name, ours_, theirs_ in losses:
        if abs(ours_ - theirs_) > LOSS_RTOL * abs(theirs_):
            return f"{name} {ours_:.6f} vs {theirs_:.6f} differs by more than {LOSS_RTOL:g} relative"
    g_ours, g_theirs = np.array(mine["grad"]), np.array(theirs["grad"])
    if np.abs(g_ours - g_theirs).max() > GRAD_RTOL * np.abs(g_theirs).max():
        return f"gradients differ by more than {GRAD_RTOL:g} of the largest entry"
    return None


def report(args, cfg, mine, theirs, numpy_peak, load):
    """Print the tables; returns why no ratio was printed (None when it was, or without a baseline)."""
    flops = step_flops(cfg, args.batch, args.size // 8, args.size // 8)
    parts = forward_flops(cfg, args.batch, args.size // 8, args.size // 8)
    fwd_weight, fwd_attn = (sum(part[i] for part in parts.values()) for i in (0, 1))
    peak = max([numpy_peak["flops"], mine["matmul_peak"]] + ([theirs["matmul_peak"]] if theirs else []))
    no_ratio = theirs and (thread_mismatch(mine, theirs) or different_work(mine, theirs))
    print(f"\n{load}\n{args.model} {args.size} px, batch {args.batch}, mode {args.mode}, "
          f"jit_level {args.jit_level}"
          f"{', recompute' if args.recompute else ''}: forward {(fwd_weight + fwd_attn) / 1e9:.1f} GFLOP "
          f"(analytic), step {flops / 1e9:.1f} GFLOP")
    print(f"fp32 matmul peak 2048^3, GFLOP/s (threads): numpy {numpy_peak['flops'] / 1e9:.1f} "
          f"({numpy_peak['threads']}), MindSpore {mine['matmul_peak'] / 1e9:.1f} ({mine['threads']})"
          + (f", PyTorch {theirs['matmul_peak'] / 1e9:.1f} ({theirs['threads']}; torch.get_num_threads() "
             f"{theirs['torch_threads']})" if theirs else ""))
    if theirs:
        counted = theirs["counted_forward_flops"]
        print(f"torch FlopCounterMode forward convs + linears: {counted / 1e9:.2f} GFLOP "
              f"(analytic / counted = {fwd_weight / counted:.3f}; it does not see CPU attention)")
    print("| side | threads | step s (median) | first call - median s | forward s | bwd/fwd | peak RSS steps GB "
          "| process peak RSS GB | GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("MindSpore", mine), ("PyTorch", theirs)):
        if r is None:
            continue
        print(f"| {name} | {r['threads']} | {r['median']:.3f} | {r['first'] - r['median']:.2f} | {r['forward']:.3f} "
              f"| {(r['median'] - r['forward']) / r['forward']:.2f} | {r['peak_rss'] / 2 ** 30:.2f} "
              f"| {r['process_peak_rss'] / 2 ** 30:.2f} | {flops / r['median'] / 1e9:.1f} "
              f"| {100 * flops / r['median'] / peak:.0f} |")
    if "unet_part" in mine:
        unet_flops = step_flops(cfg, args.batch, args.size // 8, args.size // 8, parts=("unet",))
        print(f"UNet part of the step (forward + backward to a given context, {unet_flops / 1e9:.1f} GFLOP):")
        for name, r in (("MindSpore", mine), ("PyTorch", theirs)):
            if r is not None:
                print(f"  {name}: {r['unet_part']:.3f} s, {unet_flops / r['unet_part'] / 1e9:.1f} GFLOP/s, "
                      f"{100 * unet_flops / r['unet_part'] / peak:.0f}% of peak, loss {r['unet_loss']:.6f}")
        if theirs and not no_ratio:
            print(f"  ratio ours/theirs: {mine['unet_part'] / theirs['unet_part']:.2f}")
    for name, r in (("MindSpore (CPU profiler, by op type)", mine),
                    ("PyTorch (torch.profiler, self CPU time)", theirs)):
        if r is not None and "profile" in r:
            print(f"one profiled step, {name}; op time {sum(ms for _, _, ms in r['profile']):.0f} ms in the top "
                  f"{len(r['profile'])}:\n| op | calls | ms |\n|---|---:|---:|")
            print("\n".join(f"| {op} | {calls} | {ms:.1f} |" for op, calls, ms in r["profile"]))
    step, encode = mine["median"], mine["vae_encode"]
    print(f"latent cache: the VAE encode of the batch takes {encode:.3f} s; a step with the cache "
          f"{step:.3f} s, without {step + encode:.3f} s: the cache is {(step + encode) / step:.2f}x faster")
    if theirs:
        g_ours, g_theirs = np.array(mine["grad"]), np.array(theirs["grad"])
        print(f"same work: loss {mine['loss']:.6f} vs {theirs['loss']:.6f}; gradient max abs diff "
              f"{np.abs(g_ours - g_theirs).max():.2e} (|grad| max {np.abs(g_theirs).max():.2e}); tolerances: "
              f"loss {LOSS_RTOL:g} relative, gradient {GRAD_RTOL:g} of |grad| max")
        if no_ratio:
            print(f"no ratio: {no_ratio}")
        else:
            print(f"ratio ours/theirs, both on {mine['threads']} threads: "
                  f"step {mine['median'] / theirs['median']:.2f}, forward {mine['forward'] / theirs['forward']:.2f}")
    return no_ratio or None


def main():
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark_train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "small", "sd15", "sd21"), default="tiny")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (latents are size / 8)")
    parser.add_argument("--batch", type=int, default=1, help="images per step")
    parser.add_argument("--mode", type=int, choices=(0, 1), default=0, help="0 graph, 1 PyNative")
    parser.add_argument("--jit-level", choices=("O0", "O1"), default="O0")
    parser.add_argument("--threads", type=int, default=0,
                        help="MindSpore's CPU op threads (device_context.cpu.op_tuning.threads_num; 0: its default). "
                             "The threads a matmul actually runs on are measured and given to the baseline")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps (the median is printed)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    parser.add_argument("--recompute", action="store_true",
                        help="gradient checkpointing: every UNet block recomputed in the backward (train key recompute)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, profile one more step on each side and print its N costliest ops")
    parser.add_argument("--no-unet-part", action="store_true",
                        help="skip timing the UNet part alone (forward + backward to a given context)")
    add_arguments(parser)
    parser.add_argument("--work", help="folder for the shared weights (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--torch-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_side:
        return torch_side(*args.torch_side)
    load, python = machine_load(), torch_python(args)

    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=args.mode, jit_config={"jit_level": args.jit_level})
    if args.threads:
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    cfg = model_config(args.model)
    inputs = make_inputs(cfg, args.batch, args.size)
    numpy_peak = matmul_peak(np.matmul)
    # measured before the baseline runs: its thread count is the baseline's
    our_peak = mindspore_matmul_peak()
    with scratch_dir(args.work) as work:
        inputs_path = os.path.join(work, "inputs.npz")
        np.savez(inputs_path, **inputs)
        theirs = python and run_baseline(args, python, our_peak["threads"], cfg, inputs_path, work)
        mine = ours(args, cfg, inputs, work if theirs else None)
    mine["matmul_peak"], mine["threads"] = our_peak["flops"], our_peak["threads"]
    no_ratio = report(args, cfg, mine, theirs, numpy_peak, load)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), machine=load, ours=mine, theirs=theirs, numpy_peak=numpy_peak,
                           no_ratio=no_ratio, step_flops=step_flops(cfg, args.batch, args.size // 8, args.size // 8)),
                      f)


if __name__ == "__main__":
    main()
