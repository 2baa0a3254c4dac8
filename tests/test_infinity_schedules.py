import pytest
import torch

from var.models.family import ScaleSchedule
from var.models.infinity_schedules import (
    LEVELS,
    TEMPLATES,
    image_size,
    level_of,
    nearest_template,
    official_grids,
    parse_aspect,
    parse_level,
    resolve_schedule,
    rope_grid,
    rope_positions,
    schedule_for,
)


def test_fifteen_templates_with_their_inverses():
    assert len(TEMPLATES) == 15
    assert sorted(TEMPLATES) == sorted(
        [1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333]
    )
    for ratio, grids in TEMPLATES.items():
        assert len(grids) == 13
        for count in LEVELS.values():  # every level ends on a grid of the template's aspect ratio
            h, w = grids[count - 1]
            assert abs(h / w - ratio) < 0.01
    assert TEMPLATES[0.8] == tuple((w, h) for h, w in TEMPLATES[1.25])


def test_square_1m_schedule_and_levels():
    schedule = schedule_for(1.0, "1M")
    assert [h for h, _ in schedule.shapes] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert all(h == w for h, w in schedule.shapes)
    assert schedule.length == 10521
    assert image_size(schedule) == (1024, 1024)
    assert level_of(schedule) == "1M" and rope_grid(schedule) == (64, 64)
    assert image_size(schedule_for(1.0, "0.06M")) == (256, 256)
    assert [schedule_for(1.0, level).num_scales for level in LEVELS] == [7, 10, 12, 13]
    assert rope_grid(schedule_for(0.75, 512)) == (54, 72) == schedule_for(0.75, "1M").shapes[-1]


def test_nearest_template_and_parsing():
    assert nearest_template(1.1) == 1.0
    assert nearest_template(1.125) == 1.0  # a tie goes to the earlier template, as argmin does
    assert nearest_template(0.74) == 0.75
    assert nearest_template(10.0) == 3.0
    assert parse_aspect("16:9") == pytest.approx(9 / 16)  # width first: landscape
    assert nearest_template(parse_aspect("16:9")) == 0.571
    assert parse_aspect(1.5) == 1.5
    assert parse_level("1024") == "1M" and parse_level(256) == "0.06M" and parse_level("0.60M") == "0.60M"
    with pytest.raises(ValueError, match="unknown Infinity resolution"):
        parse_level("2048")
    with pytest.raises(ValueError, match="W:H"):
        parse_aspect("wide")
    with pytest.raises(ValueError, match="positive"):
        nearest_template(0.0)


def test_resolve_schedule_from_grids():
    official = [(1, h, w) for h, w in TEMPLATES[0.75][:7]]
    schedule = resolve_schedule(official)
    assert schedule.template == 0.75 and level_of(schedule) == "0.06M"
    assert resolve_schedule([(h, w) for _, h, w in official]) == schedule
    assert official_grids(schedule) == official
    prefix = ScaleSchedule(TEMPLATES[1.0][:3], 1.0)
    assert resolve_schedule(prefix) is prefix and level_of(prefix) is None
    with pytest.raises(ValueError, match="not an official Infinity schedule"):
        resolve_schedule([(1, 1), (2, 2), (3, 3)])
    with pytest.raises(ValueError, match="not a prefix"):
        resolve_schedule(ScaleSchedule(((1, 1), (3, 3)), 1.0))
    with pytest.raises(ValueError, match="t = 1"):
        resolve_schedule([(2, 1, 1)])


def test_rope_positions_on_the_common_grid_round_half_to_even():
    schedule = schedule_for(1.333, "1M")  # U = 72 x 54
    assert rope_grid(schedule) == (72, 54)
    positions = rope_positions(schedule)
    assert positions.shape == (schedule.length, 2)
    for (begin, end), (h, w) in zip(schedule.bounds, schedule.shapes, strict=True):
        grid = positions[begin:end].view(h, w, 2)
        assert grid[0, 0].tolist() == [0, 0]
        assert int(grid[..., 0].max()) < 72 and int(grid[..., 1].max()) < 54
    begin, _ = schedule.bounds[schedule.shapes.index((16, 12))]
    cols = positions[begin: begin + 12, 1].tolist()  # x * 54 / 12 = 4.5 x
    assert cols == [0, 4, 9, 14, 18, 22, 27, 32, 36, 40, 45, 50]  # 4.5 -> 4, 13.5 -> 14, 22.5 -> 22, 40.5 -> 40
    last_begin, _ = schedule.bounds[-1]
    assert torch.equal(positions[last_begin:].view(72, 54, 2)[..., 0], torch.arange(72).view(72, 1).expand(72, 54))
