"""The classical CPU stylizer: shape, style statistics, option validation and content_region."""

from __future__ import annotations

import numpy as np
import pytest

from stylid_core.metrics import colour_distance
from stylid_core.sample_data import build_scene, load_photo
from stylid_core.stylize import STYLIZERS
from stylid_core.stylize.classical import ClassicalStylizer, lab_statistics


@pytest.fixture(scope="module")
def style():
    return load_photo("style_ihc")


@pytest.fixture(scope="module")
def content():
    return load_photo("biden")


def test_output_shape_and_dtype(content, style):
    out = STYLIZERS.create("classical").stylize(content, style)
    assert out.shape == content.shape and out.dtype == np.uint8
    odd = content[:37, :53]
    assert STYLIZERS.create("classical").stylize(odd, style).shape == (37, 53, 3)


def test_output_is_closer_to_the_style_statistics(content, style):
    out = ClassicalStylizer().stylize(content, style)
    assert colour_distance(out, style) < 0.5 * colour_distance(content, style)
    # colour transfer alone, at full strength, matches the style's Lab statistics
    pure = ClassicalStylizer(color_strength=1.0, abstraction_passes=0, levels=0, edge_strength=0.0)
    out = pure.stylize(content, style)
    assert colour_distance(out, style) < 3.0
    assert colour_distance(out, style) < colour_distance(content, style) / 5
    # at strength 0 and no filters, the content comes back
    none = ClassicalStylizer(color_strength=0.0, abstraction_passes=0, levels=0, edge_strength=0.0)
    assert np.abs(none.stylize(content, style).astype(int) - content).max() <= 1


@pytest.mark.parametrize(
    "options",
    [
        {"color_strength": 1.5},
        {"abstraction_passes": -1},
        {"abstraction_passes": 11},
        {"sigma_space": 0},
        {"sigma_color": -1},
        {"edge_sigma": 0},
        {"levels": 1},
        {"levels": -2},
        {"edge_strength": 2},
    ],
)
def test_bad_options_raise_value_error(options):
    with pytest.raises(ValueError):
        STYLIZERS.create("classical", **options)


def test_unknown_option_and_unknown_engine_raise():
    with pytest.raises(TypeError):
        STYLIZERS.create("classical", brushes=3)
    with pytest.raises(ValueError, match="unknown stylizer"):
        STYLIZERS.create("oilpaint")
    with pytest.raises(ValueError, match="no options"):
        STYLIZERS.create("identity", levels=3)


def test_content_region_restricts_the_statistics(style):
    scene, _ = build_scene([("obama", 40)], width=160, height=120)
    # a canvas: the real image on the left, a bright green block (standing in for a mosaic panel) to its right
    canvas = np.concatenate([scene, np.full((120, 200, 3), (0, 255, 0), np.uint8)], axis=1)
    pure = ClassicalStylizer(color_strength=1.0, abstraction_passes=0, levels=0, edge_strength=0.0)
    with_region = pure.stylize(canvas, style, content_region=(0, 0, 160, 120))[:, :160]
    without = pure.stylize(canvas, style)[:, :160]
    alone = pure.stylize(scene, style)
    # with the region, the image part is styled as if it were alone; without, the green panel skews it
    assert np.abs(with_region.astype(int) - alone).mean() < 1.0
    assert np.abs(without.astype(int) - alone).mean() > 10
    m_style, s_style = lab_statistics(style)
    m_region, _ = lab_statistics(with_region)
    m_without, _ = lab_statistics(without)
    assert np.abs(m_region - m_style).sum() < np.abs(m_without - m_style).sum()


def test_identity_stylizer_returns_a_copy(content, style):
    out = STYLIZERS.create("identity").stylize(content, style)
    assert np.array_equal(out, content) and out is not content
