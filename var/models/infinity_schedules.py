"""Infinity's scale schedules: the official dynamic-resolution templates (spec_infinity.md section 1).

An Infinity image is generated over a schedule of token grids (h, w), coarse to fine.  The official models
were trained on a fixed table: 15 aspect-ratio templates (h / w = 1.0, 1.25, 1.333, 1.5, 1.75, 2.0, 2.5, 3.0
and their inverses), each with 13 grids, and four resolution levels that are prefixes of those 13 grids
(``0.06M`` = 7 scales, ``0.25M`` = 10, ``0.60M`` = 12, ``1M`` = 13).  The image is 16 x the last grid
(1024 x 1024 for ratio 1.0 at 1M).

The transformer needs more than the grids: its 2-D RoPE places every scale on the last grid of the
template's ``1M`` level (U_h x U_w, e.g. 64 x 64 for ratio 1.0 or 54 x 72 for 0.75), whatever level is
generated.  A :class:`~var.models.family.ScaleSchedule` therefore carries its template ratio (``template``);
:func:`resolve_schedule` turns a plain list of grids back into one (and refuses grids that are not in the
table, with the valid choices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from var.models.family import ScaleSchedule

# pixels per token of the last grid (the BSQ tokenizer's stride; 8 x 2 with spatial patchify)
PIXELS_PER_TOKEN = 16

# The 13 (h, w) grids of each aspect-ratio template h / w (inverse ratios are added below with h, w swapped).
_BASE_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    # Official order (each ratio, then its inverse): ties in nearest_template go to the earlier entry.
    # The inverse key is truncated to 3 decimals, as the official table writes it (1/1.5 -> 0.666).
    templates = {}
    for ratio, grids in _BASE_TEMPLATES.items():
        templates[ratio] = grids
        if ratio != 1.0:
            templates[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return templates


TEMPLATES = _all_templates()
LEVELS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # level -> number of scales
LEVEL_BY_SIDE: dict[int, str] = {256: "0.06M", 512: "0.25M", 768: "0.60M", 1024: "1M"}  # square image side


def rope_grid(schedule: ScaleSchedule) -> tuple[int, int]:
    """(U_h, U_w): the last grid of the template's 1M level, on which every scale is placed."""
    return TEMPLATES[_template_of(schedule)][-1]


def image_size(schedule: ScaleSchedule) -> tuple[int, int]:
    """(height, width) in pixels."""
    h, w = schedule.shapes[-1]
    return h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN


def level_of(schedule: ScaleSchedule) -> str | None:
    """The named level ('0.06M' ... '1M') a schedule is, or None for another prefix of its template."""
    for name, count in LEVELS.items():
        if schedule.shapes == TEMPLATES[_template_of(schedule)][:count]:
            return name
    return None


def official_grids(schedule: ScaleSchedule) -> list[tuple[int, int, int]]:
    """The official spelling: a list of (t=1, h, w)."""
    return [(1, h, w) for h, w in schedule.shapes]


def _template_of(schedule: ScaleSchedule) -> float:
    if schedule.template is None:
        raise ValueError("this schedule has no Infinity template ratio; build it with schedule_for(h_div_w, level)")
    return schedule.template


def nearest_template(h_div_w: float) -> float:
    """The template ratio closest to ``h_div_w`` (height / width), ties to the official table's first."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio (height / width) must be positive, got {h_div_w}")
    return min(TEMPLATES, key=lambda ratio: abs(h_div_w - ratio))


def parse_level(level: str | int) -> str:
    """'0.06M' / '0.25M' / '0.60M' / '1M', or the side of a square image (256, 512, 768, 1024)."""
    text = str(level).strip()
    if text in LEVELS:
        return text
    if text.isdigit() and int(text) in LEVEL_BY_SIDE:
        return LEVEL_BY_SIDE[int(text)]
    choices = ", ".join(list(LEVELS) + [str(side) for side in LEVEL_BY_SIDE])
    raise ValueError(f"unknown Infinity resolution {level!r}; choose one of {choices}")


def parse_aspect(aspect: str | float) -> float:
    """Height / width from 'W:H' (width first, e.g. '16:9' is landscape) or from a number h / w."""
    if isinstance(aspect, str) and ":" in aspect:
        try:
            width, height = (float(part) for part in aspect.split(":"))
        except ValueError:
            raise ValueError(f"aspect {aspect!r} is not 'W:H' (e.g. 16:9)") from None
        if width <= 0 or height <= 0:
            raise ValueError(f"aspect {aspect!r} needs a positive width and height")
        return height / width
    try:
        value = float(aspect)
    except ValueError:
        raise ValueError(f"aspect {aspect!r} is neither 'W:H' (e.g. 16:9) nor a number height/width") from None
    if value <= 0:
        raise ValueError(f"aspect ratio height/width must be positive, got {aspect!r}")
    return value


def schedule_for(h_div_w: float = 1.0, level: str | int = "1M") -> ScaleSchedule:
    """The official schedule of the template nearest to ``h_div_w`` at a resolution level."""
    ratio = nearest_template(h_div_w)
    return ScaleSchedule(TEMPLATES[ratio][: LEVELS[parse_level(level)]], ratio)


def resolve_schedule(schedule: ScaleSchedule | Sequence[Sequence[int]]) -> ScaleSchedule:
    """A :class:`ScaleSchedule` from itself or from a list of (h, w) / official (1, h, w) grids.

    A plain list must be one of the table's named levels (the official code looks the RoPE table up by the
    exact list, and a list does not say its template otherwise).  Any prefix of a template works when passed
    as ``ScaleSchedule(grids, template=ratio)``.
    """
    if isinstance(schedule, ScaleSchedule):
        if schedule.template is None:  # a plain list of grids in a ScaleSchedule: look its template up
            return resolve_schedule(schedule.shapes)
        _check_prefix(schedule)
        return schedule
    grids = []
    for grid in schedule:
        grid = tuple(int(v) for v in grid)
        if len(grid) == 3:
            if grid[0] != 1:
                raise ValueError(f"scale {grid} has t={grid[0]}; Infinity images use t = 1 on every scale")
            grid = grid[1:]
        if len(grid) != 2:
            raise ValueError(f"a scale must be (h, w) or (1, h, w), got {grid}")
        grids.append(grid)
    grids = tuple(grids)
    for ratio, template in TEMPLATES.items():
        if grids in (template[:count] for count in LEVELS.values()):
            return ScaleSchedule(grids, ratio)
    raise ValueError(
        f"scale schedule ending at {grids[-1] if grids else None} with {len(grids)} scales is not an official "
        "Infinity schedule; build one with schedule_for(h_div_w, level) (levels: "
        f"{', '.join(LEVELS)}), or pass ScaleSchedule(grids, template_ratio) for a prefix of a template"
    )


def _check_prefix(schedule: ScaleSchedule) -> None:
    template = TEMPLATES.get(schedule.template)
    if template is None:
        raise ValueError(
            f"{schedule.template} is not a template ratio; choose one of {', '.join(map(str, TEMPLATES))}"
        )
    if not schedule.shapes or schedule.shapes != template[: len(schedule.shapes)]:
        raise ValueError(f"grids {schedule.shapes} are not a prefix of the {schedule.template} template {template}")


def rope_positions(schedule: ScaleSchedule) -> torch.Tensor:
    """(row, col) of every token on the template's RoPE grid: (L, 2) int64, scales concatenated.

    Token (y, x) of a scale (h, w) sits at (round(y * U_h / h), round(x * U_w / w)).  The products are
    computed in float32 and rounded half to even, exactly as the official table is built (3 * 54 / 4 = 40.5
    goes to 40), so every scale lands on one common grid.
    """
    rows_total, cols_total = rope_grid(schedule)
    positions = []
    for h, w in schedule.shapes:
        rows = (torch.arange(h) * (rows_total / h)).round().long()
        cols = (torch.arange(w) * (cols_total / w)).round().long()
        positions.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2))
    return torch.cat(positions)
