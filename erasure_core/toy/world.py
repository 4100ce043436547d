"""The toy world: procedural pictures with ground truth, and their captions.

Three axes, as in UnlearnCanvas: object (a shape), style (a texture) and colour.
Position, size, a small rotation, texture phase/period and background vary per
seed. Every concept has synonyms so that paraphrase leaks can be measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESOLUTION = 32
_SUPERSAMPLE = 4  # render at 4x and box-filter down, for clean edges


@dataclass(frozen=True)
class Concept:
    """A concept of one axis: its id, the canonical words and the synonyms.

    `nouns` fit "a circle with {noun}", `adjectives` fit "a {adjective} circle";
    index 0 of each is canonical, the rest are synonyms. Objects use `nouns` only.
    """

    name: str
    axis: str
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...] = ()

    @property
    def synonyms(self) -> tuple[str, ...]:
        return self.nouns[1:] + self.adjectives[1:]


OBJECTS: tuple[Concept, ...] = (
    Concept("circle", "object", ("circle", "disc", "round shape")),
    Concept("square", "object", ("square", "box", "block")),
    Concept("triangle", "object", ("triangle", "wedge", "three-sided shape")),
    Concept("diamond", "object", ("diamond", "rhombus", "lozenge")),
    Concept("star", "object", ("star", "pentagram", "spiky shape")),
    Concept("cross", "object", ("cross", "plus sign", "plus shape")),
    Concept("heart", "object", ("heart", "love symbol", "valentine")),
    Concept("ring", "object", ("ring", "donut", "hoop")),
)

STYLES: tuple[Concept, ...] = (
    Concept("plain", "style", ("no pattern", "a solid fill", "a flat fill"), ("plain", "solid", "flat")),
    Concept("stripes", "style", ("stripes", "lines", "bands"), ("striped", "lined", "banded")),
    Concept("dots", "style", ("dots", "spots", "speckles"), ("dotted", "spotted", "speckled")),
    Concept("checker", "style", ("checkers", "chessboard pattern", "tiles"), ("checkered", "chessboard", "tiled")),
    Concept("grid", "style", ("grid", "mesh", "lattice"), ("gridded", "meshed", "latticed")),
    Concept("zigzag", "style", ("zigzags", "chevrons", "sawtooth"), ("zigzag", "chevron", "jagged")),
    Concept("bars", "style", ("bars", "columns", "slats"), ("barred", "columned", "slatted")),
    Concept("hatching", "style", ("hatching", "slashes", "diagonals"), ("hatched", "slashed", "diagonal")),
)

# Few, well separated colours: colour is the hardest axis for a small model.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.96, 0.90, 0.12),
    "green": (0.10, 0.72, 0.22),
    "blue": (0.15, 0.35, 1.00),
    "purple": (0.62, 0.18, 0.85),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
OBJECT_NAMES: tuple[str, ...] = tuple(c.name for c in OBJECTS)
STYLE_NAMES: tuple[str, ...] = tuple(c.name for c in STYLES)


def concept(name: str) -> Concept:
    """Look up an object or style by id or by any of its words."""
    key = name.strip().lower()
    for c in OBJECTS + STYLES:
        if key == c.name or key in c.nouns or key in c.adjectives:
            return c
    raise KeyError(
        f"unknown concept {name!r}; objects: {', '.join(OBJECT_NAMES)}; styles: {', '.join(STYLE_NAMES)}"
    )


@dataclass(frozen=True)
class Scene:
    """Ground truth of one picture."""

    obj: int
    style: int
    colour: int
    cx: float
    cy: float
    radius: float
    angle: float
    period: float
    phase_x: float
    phase_y: float
    background: tuple[float, float, float]

    @property
    def labels(self) -> tuple[int, int, int]:
        return self.obj, self.style, self.colour


def random_scene(rng: np.random.Generator, obj: int | None = None, style: int | None = None,
                 colour: int | None = None) -> Scene:
    """Draw the free parameters of a scene; fixed axes may be given."""
    radius = float(rng.uniform(9.5, 13.5))
    lo, hi = radius + 1.0, RESOLUTION - radius - 1.0
    grey = float(rng.uniform(0.04, 0.28))
    tint = rng.uniform(-0.04, 0.04, size=3)
    return Scene(
        obj=int(rng.integers(len(OBJECTS))) if obj is None else obj,
        style=int(rng.integers(len(STYLES))) if style is None else style,
        colour=int(rng.integers(len(COLOURS))) if colour is None else colour,
        cx=float(rng.uniform(lo, hi)),
        cy=float(rng.uniform(lo, hi)),
        radius=radius,
        angle=float(rng.uniform(-0.26, 0.26)),  # about +-15 degrees: a square must not become a diamond
        period=float(rng.uniform(5.0, 6.5)),
        phase_x=float(rng.uniform(0, 8)),
        phase_y=float(rng.uniform(0, 8)),
        background=tuple(float(v) for v in np.clip(grey + tint, 0.0, 1.0)),
    )


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the sample points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (x1, y1), (x2, y2) = vertices[i], vertices[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _star_vertices(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.05, 1.05 * inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_TRIANGLE = np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]])
_STAR = _star_vertices()


def shape_mask(obj: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the shape's own unit frame (v points down, as in images)."""
    name = OBJECT_NAMES[obj]
    if name == "circle":
        return u * u + v * v <= 0.92
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return _inside_polygon(u, v, _TRIANGLE)
    if name == "diamond":
        return np.abs(u) / 0.85 + np.abs(v) <= 1.0
    if name == "star":
        return _inside_polygon(u, v, _STAR)
    if name == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if name == "heart":
        x, y = u * 1.25, -(v * 1.25 + 0.15)
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.25)
    raise ValueError(name)


def texture_mask(style: int, x: np.ndarray, y: np.ndarray, period: float, px: float, py: float) -> np.ndarray:
    """Second-tone pixels of a texture, in image coordinates (pixels)."""
    name = STYLE_NAMES[style]
    p = period
    if name == "plain":
        return np.zeros(x.shape, dtype=bool)
    if name == "stripes":  # horizontal
        return (y + py) % p < p / 2
    if name == "bars":  # vertical
        return (x + px) % p < p / 2
    if name == "hatching":  # diagonal
        q = p * 1.2
        return (x + y + px) % q < q / 2
    if name == "dots":
        dx = (x + px) % p - p / 2
        dy = (y + py) % p - p / 2
        return dx * dx + dy * dy <= (0.3 * p) ** 2
    if name == "checker":
        q = p * 0.75
        return (np.floor((x + px) / q) + np.floor((y + py) / q)) % 2 == 0
    if name == "grid":
        return ((x + px) % p < 1.3) | ((y + py) % p < 1.3)
    if name == "zigzag":
        wave = np.abs(((x + px) % p) - p / 2) * 0.9
        return (y + py + wave) % p < p / 2
    raise ValueError(name)


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _sample_grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    if res not in _GRID_CACHE:
        n = res * _SUPERSAMPLE
        c = (np.arange(n) + 0.5) / _SUPERSAMPLE
        _GRID_CACHE[res] = tuple(np.meshgrid(c, c, indexing="xy"))  # x, y in pixels
    return _GRID_CACHE[res]


def render(scene: Scene, res: int = RESOLUTION) -> np.ndarray:
    """Render a scene to an HxWx3 float32 array in [0, 1]."""
    x, y = _sample_grid(res)
    scale = res / RESOLUTION
    cos, sin = np.cos(scene.angle), np.sin(scene.angle)
    dx, dy = (x / scale - scene.cx), (y / scale - scene.cy)
    u = (cos * dx + sin * dy) / scene.radius
    v = (-sin * dx + cos * dy) / scene.radius
    inside = shape_mask(scene.obj, u, v)
    second = texture_mask(scene.style, x / scale, y / scale, scene.period, scene.phase_x, scene.phase_y)
    base = np.array(COLOURS[COLOUR_NAMES[scene.colour]], dtype=np.float32)
    light = 0.35 * base + 0.65  # the texture's second tone: a pale version of the colour
    img = np.empty(x.shape + (3,), dtype=np.float32)
    img[...] = np.asarray(scene.background, dtype=np.float32)
    img[inside] = base
    img[inside & second] = light
    n = res
    return img.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE, 3).mean(axis=(1, 3))


def caption(scene: Scene, rng: np.random.Generator, synonym_rate: float = 0.5,
            drop_colour: float = 0.3, drop_style: float = 0.15) -> str:
    """A training caption: canonical or synonym words, in one of several templates."""
    obj, sty = OBJECTS[scene.obj], STYLES[scene.style]

    def pick(words: tuple[str, ...]) -> str:
        if len(words) > 1 and rng.random() < synonym_rate:
            return words[1 + int(rng.integers(len(words) - 1))]
        return words[0]

    colour = "" if rng.random() < drop_colour else COLOUR_NAMES[scene.colour]
    with_style = rng.random() >= drop_style
    return compose(pick(obj.nouns), colour, pick(sty.nouns) if with_style else "",
                   pick(sty.adjectives) if with_style else "", template=int(rng.integers(3)))


def compose(obj_word: str, colour: str = "", style_noun: str = "", style_adj: str = "", template: int = 0) -> str:
    """Put words into a caption template. Template 0: "a red circle with stripes";
    1: "a striped red circle"; 2: "red circle, striped"."""
    head = f"{colour} {obj_word}".strip()
    if template == 0 or not style_adj:
        return f"a {head} with {style_noun}" if style_noun else f"a {head}"
    if template == 1:
        return f"a {style_adj} {head}"
    return f"{head}, {style_adj}"


def prompt(obj: int, style: int, colour: int | None = None, synonym: int = 0) -> str:
    """The evaluation prompt for a grid cell. synonym=0 uses canonical words; k>0 the k-th synonyms."""
    o, s = OBJECTS[obj], STYLES[style]
    col = COLOUR_NAMES[colour] if colour is not None else ""
    if synonym == 0:
        return compose(o.nouns[0], col, s.nouns[0], s.adjectives[0], template=0)
    k = 1 + (synonym - 1) % (len(o.nouns) - 1)
    return compose(o.nouns[k], col, s.nouns[k], s.adjectives[k], template=0)


def training_prompt(name: str) -> str:
    """The prompt an erasure method trains on for a world concept: "a circle", "a shape with stripes"."""
    c = concept(name)
    return f"a {c.nouns[0]}" if c.axis == "object" else f"a shape with {c.nouns[0]}"


def all_caption_words() -> list[str]:
    """Every caption the world can produce (for building the tokenizer)."""
    out = []
    for o in OBJECTS:
        for s in STYLES:
            for cname in ("",) + COLOUR_NAMES:
                for on in o.nouns:
                    for t in range(3):
                        for sn, sa in zip(s.nouns, s.adjectives):
                            out.append(compose(on, cname, sn, sa, template=t))
                    out.append(compose(on, cname))
    return out


def render_batch(seeds: np.ndarray | list[int], res: int = RESOLUTION, **fixed) -> tuple[np.ndarray, list[Scene]]:
    """Render one picture per seed; returns (N,3,H,W) float32 in [0,1] and the scenes."""
    scenes = [random_scene(np.random.default_rng(int(s)), **fixed) for s in seeds]
    imgs = np.stack([render(sc, res) for sc in scenes]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(imgs), scenes
