import numpy as np
import pytest

from erasure_core.toy import world as w


def test_render_is_deterministic_by_seed():
    a, sa = w.render_batch([3, 4, 5])
    b, sb = w.render_batch([3, 4, 5])
    assert sa == sb
    assert np.array_equal(a, b)
    c, _ = w.render_batch([6, 7, 8])
    assert not np.array_equal(a, c)


def test_render_range_and_shape():
    imgs, _ = w.render_batch(range(10))
    assert imgs.shape == (10, 3, w.RESOLUTION, w.RESOLUTION)
    assert imgs.dtype == np.float32
    assert imgs.min() >= 0 and imgs.max() <= 1


def _scene(obj, style, colour=0, **kw):
    base = dict(obj=obj, style=style, colour=colour, cx=16.0, cy=16.0, radius=12.0, angle=0.0, period=6.0,
                phase_x=0.0, phase_y=0.0, background=(0.1, 0.1, 0.1))
    base.update(kw)
    return w.Scene(**base)


def test_ground_truth_colour_fills_the_shape_and_background_stays():
    sq = w.OBJECT_NAMES.index("square")
    img = w.render(_scene(sq, w.STYLE_NAMES.index("plain"), colour=w.COLOUR_NAMES.index("blue")))
    assert np.allclose(img[16, 16], w.COLOURS["blue"], atol=1e-6)
    assert np.allclose(img[0, 0], (0.1, 0.1, 0.1), atol=1e-6)
    # a plain square holds one colour inside: no second tone
    inner = img[8:24, 8:24].reshape(-1, 3)
    assert np.allclose(inner, inner[0], atol=1e-6)


@pytest.mark.parametrize("style, varies_along", [("stripes", "y"), ("bars", "x")])
def test_ground_truth_texture_orientation(style, varies_along):
    img = w.render(_scene(w.OBJECT_NAMES.index("square"), w.STYLE_NAMES.index(style)))
    inner = img[8:24, 8:24, 1]
    along_x = np.abs(np.diff(inner, axis=1)).max()
    along_y = np.abs(np.diff(inner, axis=0)).max()
    assert (along_y > 0.2 and along_x < 1e-6) if varies_along == "y" else (along_x > 0.2 and along_y < 1e-6)


def test_shapes_differ_in_their_masks():
    u, v = np.meshgrid(np.linspace(-1.2, 1.2, 64), np.linspace(-1.2, 1.2, 64))
    masks = [w.shape_mask(i, u, v) for i in range(len(w.OBJECTS))]
    for i in range(len(masks)):
        assert 0.1 < masks[i].mean() < 0.8, w.OBJECT_NAMES[i]
        for j in range(i):
            assert (masks[i] != masks[j]).mean() > 0.04, (w.OBJECT_NAMES[i], w.OBJECT_NAMES[j])
    ring, circle = masks[w.OBJECT_NAMES.index("ring")], masks[w.OBJECT_NAMES.index("circle")]
    assert circle[32, 32] and not ring[32, 32]  # the ring has a hole


def test_every_concept_has_synonyms_without_its_word():
    for c in w.OBJECTS + w.STYLES:
        assert len(c.synonyms) >= 2, c.name
        canon = c.nouns[0].split()[-1]
        for syn in c.synonyms:
            assert canon not in syn.split(), (c.name, syn)


def test_synonym_prompts_never_name_the_concept():
    for o, oc in enumerate(w.OBJECTS):
        for s, sc in enumerate(w.STYLES):
            for k in (1, 2):
                words = w.prompt(o, s, synonym=k).split()
                assert oc.nouns[0] not in words
                assert sc.nouns[0] not in words and sc.adjectives[0] not in words


def test_caption_names_the_scene():
    rng = np.random.default_rng(0)
    for seed in range(200):
        scene = w.random_scene(np.random.default_rng(seed))
        text = w.caption(scene, rng)
        assert any(word in text for word in w.OBJECTS[scene.obj].nouns), text
        assert w.concept(w.OBJECTS[scene.obj].nouns[-1]).name == w.OBJECT_NAMES[scene.obj]


def test_concept_lookup():
    assert w.concept("disc").name == "circle"
    assert w.concept("Striped").name == "stripes"
    with pytest.raises(KeyError, match="unknown concept"):
        w.concept("octagon")
