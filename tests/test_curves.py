"""softalign.curves.plot_curves: one line per panel, or several with a shared legend."""

from PIL import Image

from softalign.curves import SERIES_COLORS, plot_curves


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def _colors(path) -> set:
    image = Image.open(path).convert("RGB")
    return set(image.getdata())


def test_one_line_a_panel_and_empty_curves_left_out(tmp_path):
    points = [{"step": 0, "value": 1.0}, {"step": 10, "value": 0.5}]
    plot_curves({"loss": points, "nothing yet": []}, tmp_path / "c.png")
    image = Image.open(tmp_path / "c.png")
    assert image.size == (360, 220)  # one panel, no legend
    assert _rgb(SERIES_COLORS[0]) in _colors(tmp_path / "c.png")


def test_several_lines_a_panel_share_one_legend(tmp_path):
    a = [{"step": 0, "value": 0.3}, {"step": 500, "value": 0.4}]
    b = [{"step": 0, "value": 0.3}, {"step": 500, "value": 0.2}]
    curves = {"counting": {"AGSM": a, "SoftREPA": b}, "over-count": {"SoftREPA": b, "AGSM": a}}
    plot_curves(curves, tmp_path / "c.png")
    image = Image.open(tmp_path / "c.png").convert("RGB")
    assert image.size == (720, 220 + 2 * 14)  # two panels and a two-line legend
    left, right = image.crop((0, 0, 360, 200)), image.crop((360, 0, 720, 200))
    for panel in (left, right):
        assert {_rgb(SERIES_COLORS[0]), _rgb(SERIES_COLORS[1])} <= set(panel.getdata())
    legend = set(image.crop((0, 200, 360, 248)).getdata())
    assert {_rgb(SERIES_COLORS[0]), _rgb(SERIES_COLORS[1])} <= legend
