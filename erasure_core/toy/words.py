"""Everyday words for the toy model: prompts a user types around the concept words.

The toy tokenizer was trained on the caption grammar only, so "a picture of stripes" fell apart into untrained
letter pieces and an end-of-text token in mid-prompt, and drew no stripes. `extend_tokenizer` appends whole-word
tokens for articles, picture words and plurals, the missing word-final letters and a real `<|unk|>`;
`train_word_embeddings` then learns the new tokens' input embeddings through the frozen model, with the
denoising loss on captions that wrap the world's grammar. Every weight the model had before stays bit-identical,
so every prompt of the caption grammar encodes exactly as before (the benchmark's prompts among them).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .world import OBJECTS, STYLES, caption, random_scene, render

UNK = "<|unk|>"
ORIGINAL_VOCAB_SIZE = 526  # the tokens the toy model was trained with; the words below come after them
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "star": "stars", "cross": "crosses", "heart": "hearts", "ring": "rings"}
WORDS = (
    "an", "the", "of", "and", "on", "at", "is", "this", "there", "one", "single", "two", "some", "its", "to",
    "picture", "image", "photo", "photograph", "drawing", "painting", "illustration", "sketch", "icon", "render",
    "artwork", "background", "style", "texture", "colour", "color", "object", "figure", "design", "shapes",
    "patterns", "showing", "shows", "depicting", "featuring", "drawn", "painted", "made", "filled", "covered",
    "white", "black", "small", "large", "big", "little", "simple", "bright", "dark", "pale", "colored", "coloured",
    "centered", "nice",
) + tuple(PLURALS.values())

# Filler templates the embeddings learn from. `{c}` is a world caption without its article, `{s}` a style noun
# alone (the picture's own style, any object), `{o}` an object noun. The phrasings in HELD_OUT never appear.
TRAIN_TEMPLATES = (
    "a picture of a {c}", "an image of a {c}", "a photo of a {c}", "a drawing of a {c}", "a painting of a {c}",
    "an illustration of a {c}", "a sketch of the {c}", "the {c}", "this is a {c}", "there is a {c}",
    "one {c}", "a single {c}", "a simple {c}", "a small {c}", "a large {c}", "a big {c}", "a little {c}",
    "a {c} on a white background", "a {c} on a black background", "a {c}, a nice render", "a {c} icon",
    "a {c}, artwork", "a bright {c}", "a dark {c}", "a pale {c}", "a centered {c}", "a {c} design",
    "a drawing of {s}", "a photo of {s}", "an illustration showing {s}", "a texture of {s}", "{s} style",
    "a pattern of {s}", "some {s}", "a figure filled with {s}", "an object covered with {s}",
    "a design made of {s}", "patterns of {s}", "a picture showing the {o}", "a photograph depicting a {o}",
    "an image featuring a {o}", "a sketch of its {o}", "a painted {o}", "a drawn {o}", "a colored {o}",
    "a coloured {o}", "the {o} and its colour", "a {o} of some color", "shapes: a {o}", "a {o} at the centre",
    "two {p}", "some {p}", "{p} with {s}", "a picture of {p}",
)
HELD_OUT = ("a picture of {s}", "an image showing a {o}", "a photo showing the {o} with {s}", "an illustration of {p}",
            "the image of a {o}")


def extend_tokenizer(folder: Path) -> list[str]:
    """Append `<|unk|>`, the missing word-final letters and `WORDS` to the committed tokenizer files in place;
    return the tokens added. Existing ids and merges are untouched, and each word's merges are appended after all
    of them, so every caption word still splits as before."""
    from tokenizers import Tokenizer

    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    vocab, merges = model["vocab"], model["merges"]
    if UNK in vocab:
        raise ValueError(f"{folder} is extended already")
    added: list[str] = []

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)
            added.append(token)

    add(UNK)
    spec["added_tokens"].append({"id": vocab[UNK], "content": UNK, "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    model["unk_token"] = UNK
    for letter in "abcdefghijklmnopqrstuvwxyz":
        add(letter + "</w>")
    for word in WORDS:
        pieces = Tokenizer.from_str(json.dumps(spec)).encode(word, add_special_tokens=False).tokens
        while len(pieces) > 1:  # merge left to right from the split the tokenizer makes today
            merged = pieces[0] + pieces[1]
            merges.append([pieces[0], pieces[1]])
            add(merged)
            pieces = [merged] + pieces[2:]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["unk_token"] = UNK
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return added


def _body(text: str) -> str:
    return text[2:] if text.startswith("a ") else text


def word_caption(rng: np.random.Generator, scene, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """A caption of `scene` in one of `templates`."""
    obj, sty = OBJECTS[scene.obj], STYLES[scene.style]
    template = templates[int(rng.integers(len(templates)))]
    return template.format(c=_body(caption(scene, rng)), s=sty.nouns[0], o=obj.nouns[0], p=PLURALS[obj.name])


def training_batch(step: int, batch: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions of a step, every caption in a filler template (a caption of the world's own
    grammar holds no new token, so it would teach the new embeddings nothing)."""
    images, captions = [], []
    for i in range(batch):
        rng = np.random.default_rng([seed, step, i])
        scene = random_scene(rng)
        images.append(render(scene))
        captions.append(word_caption(rng, scene))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1).contiguous(), captions


def train_word_embeddings(denoiser, steps: int = 400, batch: int = 16, lr: float = 5e-3, seed: int = 0,
                          first_new: int = ORIGINAL_VOCAB_SIZE) -> list[float]:
    """Learn the input embeddings of tokens `first_new`.. through the frozen model (denoising loss, min-SNR
    weighted as the toy model was trained); every other weight stays as it is. Returns the loss per 50 steps."""
    from .model import MAX_TOKENS, train_scheduler
    from .train import MIN_SNR_GAMMA

    encoder, unet, tok = denoiser.text_encoders[0], denoiser.unet, denoiser.tokenizer
    for p in list(encoder.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    table = encoder.get_input_embeddings().weight
    singular = {tok.convert_tokens_to_ids(PLURALS[o.name] + "</w>"): tok.convert_tokens_to_ids(o.name + "</w>")
                for o in OBJECTS}
    article = tok.convert_tokens_to_ids("a</w>")
    # plurals start as their singular, every other new token as the article "a": near-neutral from step 0
    new = table[[singular.get(i, article) for i in range(first_new, len(table))]].detach().clone()
    new.requires_grad_(True)
    old = table[:first_new].detach().clone()
    opt = torch.optim.Adam([new], lr=lr)
    sched = train_scheduler()
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
    gen = torch.Generator().manual_seed(seed)
    losses, window = [], []
    hook = encoder.get_input_embeddings().register_forward_hook(
        lambda _m, inputs, _out: F.embedding(inputs[0], torch.cat([old, new])))
    try:
        for step in tqdm(range(steps), desc="toy-words"):
            x0, captions = training_batch(step, batch, seed)
            ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                      return_tensors="pt").input_ids
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
            pred = unet(sched.add_noise(x0, noise, t), t, encoder(ids)[0]).sample
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(loss.item())
            if len(window) == 50:
                losses.append(round(float(np.mean(window)), 5))
                window.clear()
    finally:
        hook.remove()
    with torch.no_grad():
        table[first_new:] = new.detach()
    return losses


def extend_toy_model(folder: Path, steps: int = 400, seed: int = 0) -> dict:
    """Extend the toy model in `folder` (its tokenizer and text encoder; the UNet file is not touched) and return
    what was done. The embedding rows the model had are written back from the file as they were."""
    from safetensors.torch import load_file, save_file

    from .model import load_tokenizer, load_toy_model

    denoiser = load_toy_model(folder)
    added = extend_tokenizer(folder / "tokenizer")
    denoiser.tokenizers[0] = load_tokenizer(folder / "tokenizer")
    denoiser.text_encoders[0].resize_token_embeddings(len(denoiser.tokenizer), mean_resizing=False)
    losses = train_word_embeddings(denoiser, steps=steps, seed=seed)
    path = folder / "text_encoder.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    table = denoiser.text_encoders[0].get_input_embeddings().weight.detach()
    state[key] = torch.cat([state[key], table[len(state[key]):].to(state[key].dtype)]).contiguous()
    save_file(state, str(path))
    config = json.loads((folder / "text_config.json").read_text())
    return {"added": len(added), "vocabulary": len(denoiser.tokenizer), "losses": losses, "steps": steps,
            "text_config": config}


def check_prompts() -> list[tuple[str, str, str]]:
    """(prompt, axis, concept) of the held-out phrasings, one per object and per style, in the templates that
    training never used."""
    out = []
    for template in HELD_OUT:
        for o in OBJECTS:
            if "{o}" in template or "{p}" in template:
                out.append((template.format(o=o.nouns[0], p=PLURALS[o.name], s=STYLES[1].nouns[0]), "object", o.name))
        if "{s}" in template and "{o}" not in template:
            out += [(template.format(s=s.nouns[0]), "style", s.name) for s in STYLES]
    return out

