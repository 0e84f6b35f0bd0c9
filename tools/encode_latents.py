#!/usr/bin/env python3
"""Encode one split of an ImageFolder tree (ImageNet) into VAE latent shards for latent DiT runs.

    python tools/encode_latents.py --data data/imagenet --split train --out data/imagenet-latents/train --flips
    python tools/encode_latents.py --data data/imagenet --split val   --out data/imagenet-latents/val

Images are center-cropped to --image_size as DiT does, encoded by a Stable Diffusion VAE
(``diffusers``' AutoencoderKL; ``pip install 'dbl[vae]'``) from a local folder or the hub, and
written as shards plus ``meta.json`` (format: ``dbl.data.latents``). ``--flips`` also stores each
image's mirror image, which the training loader picks at random (DiT's flip augmentation).
On one H100, ImageNet train (1.28 M images, with flips) takes about an hour at batch 256 with
16 loader workers; without a GPU it is impractical.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from dbl.data.imagenet import CenterCroppedImageFolder
from dbl.data.latents import encode_split, load_vae


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root holding <split>/<class>/<image>")
    p.add_argument("--split", default="train", help="sub-folder of --data to encode (train or val)")
    p.add_argument("--out", required=True, help="output folder for shards and meta.json")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="local folder or hub id of an AutoencoderKL")
    p.add_argument("--vae_subfolder", default=None, help="sub-folder of --vae holding the VAE (e.g. 'vae')")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--shard_size", type=int, default=10_000, help="images per shard file")
    p.add_argument("--flips", action="store_true", help="also store each image's left-right mirror")
    p.add_argument("--num_workers", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior draws")
    args = p.parse_args(argv)

    images = CenterCroppedImageFolder(f"{args.data}/{args.split}", args.image_size)
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False)
    vae = load_vae(args.vae, args.vae_subfolder, args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    meta = encode_split(loader, vae, args.out, vae_name=args.vae, image_size=args.image_size, classes=images.classes,
                        shard_size=args.shard_size, flips=args.flips, generator=generator, device=args.device)
    print(f"wrote {meta['num_images']} latents {meta['latent_shape']} x {meta['views']} view(s) in "
          f"{len(meta['shards'])} shards to {args.out} (scale factor {meta['scale_factor']})")


if __name__ == "__main__":
    main()
