"""A contact sheet: the mined frames side by side, each with its box drawn and a caption, for a quick look."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from objret import storage

BOX_COLOUR = (255, 0, 255)  # magenta: rare in real scenes, so the box stands out
BOX_WIDTH = 3
BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (235, 235, 235)
PAD = 6  # pixels around every cell
CAPTION_HEIGHT = 20
TITLE_HEIGHT = 28


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """The text, cut with '...' so it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _thumbnail(rgb: np.ndarray, thumb: int) -> tuple[Image.Image, float]:
    array = np.asarray(rgb)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB")
    scale = thumb / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


def contact_sheet(
    images: list[tuple[np.ndarray, tuple[float, float, float, float], str]],
    columns: int = 5,
    thumb: int = 256,
    title: str | None = None,
    box_width: int = BOX_WIDTH,
) -> Image.Image:
    """Frames (RGB array, box x/y/w/h in that frame's pixels, caption) on a grid of thumb x thumb cells.

    The sheet is ``cols * (thumb + PAD) + PAD`` wide and ``rows * (thumb + CAPTION_HEIGHT + PAD) + PAD``
    high (plus TITLE_HEIGHT with a title), where cols = min(columns, len(images)). A frame's box may also be
    an N x 4 array of boxes (all drawn) or None (none drawn).
    """
    cols = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / cols))
    cell_height = thumb + CAPTION_HEIGHT
    top = TITLE_HEIGHT if title else 0
    sheet = Image.new(
        "RGB", (cols * (thumb + PAD) + PAD, top + rows * (cell_height + PAD) + PAD), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    caption_font, title_font = _font(13), _font(16)
    if title:
        title_text = _fit_text(draw, title, title_font, sheet.width - 2 * PAD)
        draw.text((PAD, PAD), title_text, fill=TEXT_COLOUR, font=title_font)
    if not images:
        draw.text((PAD, top + PAD), "no frames", fill=TEXT_COLOUR, font=caption_font)

    for i, (rgb, box, caption) in enumerate(images):
        cell_x = PAD + (i % cols) * (thumb + PAD)
        cell_y = top + PAD + (i // cols) * (cell_height + PAD)
        small, scale = _thumbnail(rgb, thumb)
        # Centre the thumbnail across its cell, at the cell's top so the caption sits right under it.
        left = cell_x + (thumb - small.width) // 2
        upper = cell_y
        sheet.paste(small, (left, upper))

        # Draw on the sheet after resizing, so the outline keeps its exact colour and width.
        for x, y, w, h in np.asarray(box if box is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4):
            x0 = left + min(max(x * scale, 0), small.width - 1)
            y0 = upper + min(max(y * scale, 0), small.height - 1)
            x1 = left + min(max((x + w) * scale - 1, 0), small.width - 1)
            y1 = upper + min(max((y + h) * scale - 1, 0), small.height - 1)
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=BOX_COLOUR, width=box_width)

        text = _fit_text(draw, caption, caption_font, thumb)
        draw.text((cell_x, upper + small.height + 3), text, fill=TEXT_COLOUR, font=caption_font)
    return sheet


def heat_overlay(rgb: np.ndarray, values: np.ndarray, frame_share: float = 0.3) -> np.ndarray:
    """A map (h x w, any scale) upsampled to the frame, scaled by its maximum, in the inferno colour map over
    the frame's grey levels (``frame_share`` of them), as an RGB uint8 array of the frame's size."""
    import cv2

    frame = np.asarray(rgb)
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    height, width = frame.shape[:2]
    values = np.nan_to_num(np.asarray(values, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    unit = np.clip(values / peak, 0, 1) if peak > 0 else np.zeros_like(values)
    unit = cv2.resize(unit, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((unit * 255).astype(np.uint8), cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    grey = frame.reshape(height, width, -1)[..., :3].mean(axis=2, keepdims=True)
    return np.clip((1 - frame_share) * heat + frame_share * grey, 0, 255).astype(np.uint8)


def saliency_panels(rgb: np.ndarray, feature_saliency: np.ndarray, object_saliency: np.ndarray,
                    region_boxes: np.ndarray, *, thumb: int = 320, title: str | None = None,
                    region_caption: str = "regions") -> Image.Image:
    """One frame as three panels side by side: its feature saliency (003 eq. 1-2), its object saliency
    (eq. 14) and the frame with ``region_boxes`` (N x 4, x/y/w/h in frame pixels) drawn.

    Each map is shown over the frame, scaled by its own maximum (given in the caption). The image has
    contact_sheet's size for 3 columns and one row: ``3 * (thumb + PAD) + PAD`` wide.
    """
    tiles = [(heat_overlay(rgb, feature_saliency), None,
              f"feature saliency (max {float(np.max(feature_saliency)):.3g})"),
             (heat_overlay(rgb, object_saliency), None,
              f"object saliency (max {float(np.max(object_saliency)):.3g})"),
             (rgb, np.asarray(region_boxes, np.float64).reshape(-1, 4), region_caption)]
    return contact_sheet(tiles, columns=3, thumb=thumb, title=title, box_width=1)


def save_png(image: Image.Image, path: str, endpoint_url: str | None = None) -> str:
    """Write the image as PNG to a local path or s3:// URI (atomically) and return the location."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(str(path), buffer.getvalue(), endpoint_url)
    return str(path)
