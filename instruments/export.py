"""
export.py - a trained run as a folder diffusers alone loads and samples: unet/ (the EMA weights, safetensors),
scheduler/ (CARD_SAMPLER on the run's training schedule) and README.md (a model card with a plain-diffusers loop).

    python instruments/export.py --ckpt runs/quickstart        # -> runs/quickstart/{unet,scheduler,README.md}
    python instruments/export.py --ckpt runs/x/snapshots/ema_step002700.pt --out hub/x --overwrite

Then, with nothing of this project: UNet2DModel.from_pretrained("runs/quickstart", subfolder="unet"); the card's
code draws a film and marks it synthetic (tests/test_export.py runs it).
"""
import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py, beside the pipeline's scripts
import model

CARD_SAMPLER = "ddim"  # the card's plain-diffusers loop: ddim-2m's first-order part, a diffusers scheduler
OUTPUTS = ("unet", "scheduler", "README.md")
MULTI_EMBED = """
E = unet.class_embedding.weight.detach()  # ({n}, D): a vector per finding, the last the null label's
unet.class_embedding = torch.nn.Identity()  # class_labels below are already embedded: a film's findings summed
onehot = torch.zeros(2, {n})  # (2, {n}): the findings, then the null label
onehot[0, y], onehot[1, {null}] = 1, 1"""

CARD = """---
library_name: diffusers
tags: [medical-imaging, chest-x-ray, synthetic-data, ddpm]
---
# Synthetic chest X-rays: a class-conditional DDPM ({size}x{size}, grayscale)

**Synthetic images, not patient images. Not for diagnosis** or any clinical decision. Mark every image you save
or share as synthetic (the code below writes `synthetic=1` into the PNG).

- `unet/`: diffusers `UNet2DModel`, {size}x{size} px in [-1, 1] (8-bit gray = round((x + 1) * 127.5)), prediction_type
  "{c.prediction_type}" (epsilon: the noise; v_prediction: sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0).
- `scheduler/`: `{cls}` on the training schedule, timestep spacing "{c.timestep_spacing}"; any diffusers scheduler
  can be built from its config. Sampling: {steps} steps, guidance w = {w}: out = out_null + w (out_cond - out_null).

| {head} |
|---|---|
{rows}
| {null} | null label: the unconditional model, for classifier-free guidance |

```python
import torch
from diffusers import UNet2DModel, {cls}
from PIL import Image, PngImagePlugin

folder, y, w, seed = ".", {y}, {w}, 0  # this folder; {y_what}; guidance scale; noise seed
unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval(){embed}
scheduler = {cls}.from_pretrained(folder, subfolder="scheduler")
scheduler.set_timesteps({steps})
size, g, labels = unet.config.sample_size, torch.Generator().manual_seed(seed), {labels}
x = torch.randn(1, 1, size, size, generator=g)  # (1, 1, H, W): pure noise, scaled to unit spread (no grainy films)
x = x / x.std() * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:  # the class and the null label in one batch of 2
        x_in = scheduler.scale_model_input(x, t).repeat(2, 1, 1, 1)
        out_cond, out_null = unet(x_in, t, class_labels=labels).sample.chunk(2)  # {c.prediction_type}
        x = scheduler.step(out_null + w * (out_cond - out_null), t, x{gen}).prev_sample
gray = ((x.clamp(-1, 1)[0, 0] + 1) * 127.5).round().byte().numpy()  # (H, W) uint8
info = PngImagePlugin.PngInfo()
info.add_text("synthetic", "1")
Image.fromarray(gray).save(f"synthetic_{fname}_seed{{seed}}.png", pnginfo=info)
```
"""


def export_pretrained(unet, out_dir, schedule=None, classes=model.CLASSES, multi_label=False):
    """Write out_dir/unet, out_dir/scheduler, out_dir/README.md (replacing them); other files in out_dir are kept."""
    tmp = os.path.join(out_dir, "export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash mid-export
    if multi_label:  # saved as the nn.Embedding it was built from: a plain UNet2DModel (the card sums the vectors)
        unet = copy.deepcopy(unet)
        unet.class_embedding = torch.nn.Embedding(unet.config.num_class_embeds, unet.class_embedding.embedding_dim,
                                                  _weight=unet.class_embedding.weight.data)
    unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    scheduler = model.diffusers_scheduler(CARD_SAMPLER, (schedule or model.make_schedule()).config)
    # write every value: diffusers re-reads the ones it marks as defaults from whatever version loads the file
    scheduler = type(scheduler).from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    rows, null = "\n".join(f"| {i} | {name} |" for i, name in enumerate(classes)), model.null_label(unet)
    if multi_label:  # a pair of findings, e.g. Effusion + Atelectasis
        pair = [i for i, c in enumerate(classes) if c in ("Effusion", "Atelectasis")][::-1] or [0, 1][:len(classes)]
        card = dict(head="column of class_labels | finding (none set: No Finding)", y=pair, fname="findings",
                    y_what="findings " + " + ".join(classes[i] for i in pair), labels="onehot @ E",
                    embed=MULTI_EMBED.format(n=null + 1, null=null))
    else:
        y = min(3, len(classes) - 1)
        card = dict(head="class_labels | class", y=y, y_what=f"class {y} = {classes[y]}", fname="class{y}",
                    labels=f"torch.tensor([y, {null}])", embed="")
    with open(os.path.join(tmp, "README.md"), "w") as f:  # only ddpm adds noise each step: it takes the generator
        f.write(CARD.format(size=unet.config.sample_size, c=scheduler.config, cls=type(scheduler).__name__, rows=rows,
                            null=null, steps=model.DEFAULT_STEPS[CARD_SAMPLER], w=model.DEFAULT_GUIDANCE, **card,
                            gen=", generator=g" if CARD_SAMPLER == "ddpm" else ""))
    for name in OUTPUTS:  # each renamed into place whole: no reader sees half a unet/
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(prog="export.py", description="a checkpoint as a diffusers folder with a model card",
                                formatter_class=model.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file (ckpt.pt or a snapshot), or a run folder")
    p.add_argument("--out", default=None, help="folder for unet/, scheduler/, README.md (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out (other files stay)")
    args = p.parse_args(argv)
    try:
        ckpt = model.load_checkpoint(args.ckpt)
        unet = model.unet_from_checkpoint(ckpt, path=args.ckpt)  # the EMA weights
    except ValueError as e:
        raise SystemExit(f"export.py: error: --ckpt {e}")
    out = args.out or (args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt)))
    if (held := [n for n in OUTPUTS if os.path.exists(os.path.join(out, n))]) and not args.overwrite:
        raise SystemExit(f"export.py: error: --out {out} already holds {held[0]}: pass --overwrite to replace the "
                         f"export (other files stay), or choose another --out")
    os.makedirs(out, exist_ok=True)
    export_pretrained(unet, out, model.schedule_of(ckpt), ckpt["classes"], ckpt.get("labels") == "multi")
    print(f"export.py: step {ckpt.get('step')} EMA weights -> {out}/unet, {out}/scheduler, {out}/README.md")


if __name__ == "__main__":
    main()
