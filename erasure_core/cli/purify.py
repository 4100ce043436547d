"""erasure purify: All-but-One purification of a real image (invert under the original model, regenerate under
the patched one)."""
from __future__ import annotations

from .common import (UserError, add_model_option, add_patch_options, check_patches, finite_float, load_model,
                     load_patches, png_path, positive_int, progress_bar)


def add_parser(sub) -> None:
    p = sub.add_parser("purify", help="remove erased concepts from an image (All-but-One purification)")
    p.add_argument("--image", required=True, help="input image (resized to the model's resolution)")
    p.add_argument("--out", required=True, help="output PNG")
    add_patch_options(p, required=True, help="erasure patch (repeatable)")
    p.add_argument("--prompt", help="what the image shows (default: the patch's erased concept)")
    p.add_argument("--compare", help="also write an input | purified PNG here")
    add_model_option(p)
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM inversion steps")
    p.add_argument("--guidance", type=finite_float, default=1.0,
                   help="guidance of inversion and regeneration (1 keeps the inversion exact)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..imaging import save_grid
    from ..purify import purify
    from ..vocabulary import concept_prompt

    out = png_path(args.out, "--out")
    compare = png_path(args.compare, "--compare") if args.compare else None  # checked before anything is written
    patches = load_patches(args.patch, args.strength)
    try:
        picture = Image.open(args.image).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read --image {args.image}: {exc}") from None
    model = load_model(args.model, args.prediction_type)
    check_patches(model, patches)
    size = model.image_size
    picture = picture.resize((size, size), Image.BICUBIC)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    concepts = patches[0][0].concepts
    if args.prompt is not None:
        prompt = args.prompt
    else:
        try:
            prompt = concept_prompt(model, concepts[0]) if concepts else ""
        except KeyError as exc:
            raise UserError(exc.args[0]) from None
    latents = model.encode_image(image)
    purified = model.decode(purify(model, patches, latents, prompt, steps=args.steps, guidance=args.guidance,
                                   progress=progress_bar("purify")))
    Image.fromarray((purified[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out)
    print(f"wrote {out}")
    if compare:
        save_grid(torch.cat([image, purified]), compare, ncols=2, scale=max(1, 256 // size),
                  col_labels=["input", "purified"], title=f'purify with "{prompt}"')
        print(f"wrote {compare}")
    return 0
