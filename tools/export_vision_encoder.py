#!/usr/bin/env python
"""Export a trained medcap vision encoder as an open_clip ``local-dir`` folder.

    python tools/export_vision_encoder.py --vision_checkpoint RUN/checkpoint/meta_model_9.pt \
        --output_dir exported/biomedclip_slake

    import open_clip
    model = open_clip.create_model("local-dir:exported/biomedclip_slake")
    features = model.encode_image(pixels)   # the trained image features
"""

from __future__ import annotations

import argparse

from medcap.models.checkpoints import export_open_clip_dir, load_checked, read_vision_checkpoint
from medcap.models.vision import build_vision_encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vision_checkpoint", required=True, help="meta_model_{epoch}.pt or the original last.pt"
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--vision",
        default=None,
        help="encoder name (default: read from the checkpoint; original files are biomedclip)",
    )
    parser.add_argument("--vision_path", default=None, help="open_clip folder whose config defines the tower")
    args = parser.parse_args(argv)

    ckpt = read_vision_checkpoint(args.vision_checkpoint)
    name = args.vision or ckpt.meta.get("encoder", "biomedclip")
    encoder = build_vision_encoder(name, args.vision_path)
    load_checked(encoder.tower, ckpt.visual, f"{ckpt.path} ['visual']")
    out = export_open_clip_dir(encoder, args.output_dir)
    print(f"exported {name} image tower ({len(ckpt.visual)} tensors) to {out}")
    print(f'  open_clip.create_model("local-dir:{out}").encode_image(pixels)')


if __name__ == "__main__":
    from medcap.errors import run_main

    run_main(main)
