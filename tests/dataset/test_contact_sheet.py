"""objret.dataset.contact_sheet: the grid has the documented size and the boxes are drawn in the box colour."""

import numpy as np
from PIL import Image

from objret.dataset.contact_sheet import BOX_COLOUR, CAPTION_HEIGHT, PAD, TITLE_HEIGHT, contact_sheet, save_png


def grey_frame(width=320, height=240, level=90):
    return np.full((height, width, 3), level, dtype=np.uint8)


def test_sheet_size_follows_the_grid():
    frames = [(grey_frame(), (10, 10, 50, 50), f"#{i} 0.9") for i in range(7)]
    sheet = contact_sheet(frames, columns=3, thumb=128)
    assert sheet.mode == "RGB"
    assert sheet.size == (3 * (128 + PAD) + PAD, 3 * (128 + CAPTION_HEIGHT + PAD) + PAD)

    titled = contact_sheet(frames[:2], columns=5, thumb=64, title="rep-1: person (false_negative)")
    assert titled.size == (2 * (64 + PAD) + PAD, TITLE_HEIGHT + 64 + CAPTION_HEIGHT + 2 * PAD)


def test_box_pixels_carry_the_box_colour():
    # A 320x240 frame in a 160 px cell is halved: box (100, 60, 80, 40) becomes (50, 30, 40, 20).
    sheet = np.asarray(contact_sheet([(grey_frame(), (100, 60, 80, 40), "#1 0.93")], thumb=160))
    left, top = PAD, PAD  # a landscape thumbnail fills its cell's width, at the cell's top
    assert tuple(sheet[top + 30, left + 50 + 20]) == BOX_COLOUR  # top edge
    assert tuple(sheet[top + 30 + 10, left + 50]) == BOX_COLOUR  # left edge
    assert tuple(sheet[top + 30 + 10, left + 50 + 20]) == (90, 90, 90)  # inside: the frame untouched
    assert tuple(sheet[top + 5, left + 5]) == (90, 90, 90)  # away from the box
    # The caption is drawn under the thumbnail.
    caption = sheet[top + 120 : top + 120 + CAPTION_HEIGHT, PAD : PAD + 160]
    assert (caption.max(axis=2) > 128).any()


def test_box_past_the_frame_edge_is_drawn_inside_the_thumbnail():
    sheet = np.asarray(contact_sheet([(grey_frame(100, 100), (80, 80, 50, 50), "edge")], thumb=100))
    assert tuple(sheet[PAD + 99, PAD + 90]) == BOX_COLOUR  # bottom edge, clipped to the last row


def test_empty_list_gives_a_small_sheet():
    sheet = contact_sheet([], thumb=64, title="no matches")
    assert sheet.size == (64 + 2 * PAD, TITLE_HEIGHT + 64 + CAPTION_HEIGHT + 2 * PAD)


def test_save_png(tmp_path):
    path = tmp_path / "sheets" / "rep-1.png"
    sheet = contact_sheet([(grey_frame(), (10, 10, 50, 50), "#1")], thumb=64)
    assert save_png(sheet, str(path)) == str(path)
    with Image.open(path) as loaded:
        assert (loaded.format, loaded.size) == ("PNG", sheet.size)


def test_saliency_panels_show_three_panels_side_by_side():
    from objret.dataset.contact_sheet import saliency_panels

    frame = grey_frame(320, 240, level=120)
    feature = np.zeros((6, 8), np.float32)
    feature[:, :4] = 1.0                       # salient left half
    obj = np.zeros((6, 8), np.float32)
    obj[2:4, 5:7] = 7.0                        # one object on the right
    boxes = np.array([[200, 80, 80, 80], [10, 10, 40, 30]], np.float32)
    image = saliency_panels(frame, feature, obj, boxes, thumb=160, title="frame 1")
    assert image.size == (3 * (160 + PAD) + PAD, TITLE_HEIGHT + 160 + CAPTION_HEIGHT + 2 * PAD)
    sheet = np.asarray(image).astype(int)
    top = TITLE_HEIGHT + PAD
    panels = [sheet[top:top + 120, PAD + i * (160 + PAD):PAD + i * (160 + PAD) + 160] for i in range(3)]
    # Panel 1, feature saliency: the left half glows (inferno: bright), the right half is dark.
    left, right = panels[0][30:90, 10:70].mean(), panels[0][30:90, 90:150].mean()
    assert left > right + 60
    # Panel 2, object saliency: bright at the object's cells only (x 200-280, y 80-160 -> thumb /2).
    assert panels[1][45:75, 105:135].mean() > panels[1][45:75, 20:60].mean() + 60
    # Panel 3, the frame itself with the region boxes in the box colour (and nothing else in that colour).
    colour = (panels[2] == BOX_COLOUR).all(axis=2)
    assert colour[40, 100:140].all() and colour[5, 5:25].all()       # top edges of both boxes, halved
    assert not (panels[0] == BOX_COLOUR).all(axis=2).any() and not (panels[1] == BOX_COLOUR).all(axis=2).any()
    assert tuple(panels[2][100, 20]) == (120, 120, 120)               # the frame untouched elsewhere
