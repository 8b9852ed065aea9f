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
) -> Image.Image:
    """Frames (RGB array, box x/y/w/h in that frame's pixels, caption) on a grid of thumb x thumb cells.

    The sheet is ``cols * (thumb + PAD) + PAD`` wide and ``rows * (thumb + CAPTION_HEIGHT + PAD) + PAD``
    high (plus TITLE_HEIGHT with a title), where cols = min(columns, len(images)).
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
        x, y, w, h = box
        x0 = left + min(max(x * scale, 0), small.width - 1)
        y0 = upper + min(max(y * scale, 0), small.height - 1)
        x1 = left + min(max((x + w) * scale - 1, 0), small.width - 1)
        y1 = upper + min(max((y + h) * scale - 1, 0), small.height - 1)
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=BOX_COLOUR, width=BOX_WIDTH)

        text = _fit_text(draw, caption, caption_font, thumb)
        draw.text((cell_x, upper + small.height + 3), text, fill=TEXT_COLOUR, font=caption_font)
    return sheet


def save_png(image: Image.Image, path: str, endpoint_url: str | None = None) -> str:
    """Write the image as PNG to a local path or s3:// URI (atomically) and return the location."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(str(path), buffer.getvalue(), endpoint_url)
    return str(path)
