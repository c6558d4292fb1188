"""Real aerial photos with tree boxes, read from the ``deepforest`` wheel (MIT) without installing it.

deepforest's own requirements clash with graft's, but a wheel is a zip file: the project's set-up
(``make install``) fetches it with ``pip download --no-deps deepforest==2.1.0`` into
``.venv/share/graft/``, and this module reads the four annotated photos (Pascal VOC XML, about
950 boxes) straight from it. The two large photos are cut into tiles; boxes keep the part inside
their tile when at least half of the box is there.
"""

from __future__ import annotations

import io
import os
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from graft.errors import DataError

WHEEL = "deepforest-2.1.0-py3-none-any.whl"
PHOTOS = ("OSBS_029", "SOAP_061", "2019_YELL_2_541000_4977000_image_crop", "2019_YELL_2_528000_4978000_image_crop2")
TILE = 400
MIN_INSIDE = 0.5  # share of a box's area that must lie in a tile for the tile to keep it


def wheel_path() -> Path:
    """Where the set-up put the wheel: $GRAFT_DEEPFOREST_WHEEL, else the environment's share/graft/."""
    candidates = [os.environ.get("GRAFT_DEEPFOREST_WHEEL"), str(Path(sys.prefix) / "share" / "graft" / WHEEL)]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise DataError(
        f"the detection demo reads real tree photos from the {WHEEL} wheel, which is not at {candidates[-1]}; "
        f"run `make install` (it fetches it), or `pip download --no-deps deepforest==2.1.0 -d {Path(candidates[-1]).parent}`"
    )


def read_photos(wheel: Path | None = None) -> list[tuple[str, Image.Image, np.ndarray]]:
    """(name, RGB photo, boxes [N, 4] xyxy pixels) of every annotated photo in the wheel; every
    class (Tree, Alive, Dead) counts as a tree."""
    wheel = wheel or wheel_path()
    out = []
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            for name in PHOTOS:
                xml_name = f"deepforest/data/{name}.xml"
                root = ET.fromstring(z.read(xml_name))
                image_name = f"deepforest/data/{root.findtext('filename')}"
                if image_name not in names:
                    image_name = f"deepforest/data/{name}.png"
                Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 10_000_000)
                photo = Image.open(io.BytesIO(z.read(image_name))).convert("RGB")
                boxes = np.array([[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in root.findall("object")], np.float64).reshape(-1, 4)
                boxes[:, :2] -= 1  # VOC pixels are 1-based
                out.append((name, photo, boxes))
    except (zipfile.BadZipFile, KeyError, ET.ParseError, OSError) as err:
        raise DataError(f"{wheel}: cannot read the tree photos from it ({err}); fetch it again with `pip download --no-deps deepforest==2.1.0`") from None
    return out


def tiles(photo: Image.Image, boxes: np.ndarray, tile: int = TILE) -> list[tuple[tuple[int, int], Image.Image, np.ndarray]]:
    """A grid of equal tiles at most ``tile`` pixels on a side that do not overlap (so no pixel is in
    two splits), each with the boxes that lie at least half inside it, clipped, in tile pixels."""
    w, h = photo.size
    cols, rows = -(-w // tile), -(-h // tile)
    xs = [round(i * w / cols) for i in range(cols + 1)]
    ys = [round(j * h / rows) for j in range(rows + 1)]
    out = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for y0, y1 in zip(ys, ys[1:]):
        for x0, x1 in zip(xs, xs[1:]):
            clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1), boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], 1)
            inside = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
            keep = inside >= MIN_INSIDE * area
            out.append(((x0, y0), photo.crop((x0, y0, x1, y1)), clipped[keep] - [x0, y0, x0, y0]))
    return out


def write_tree_tiles(root: Path, *, tile: int = TILE) -> Path:
    """``root`` as Pascal VOC (Annotations/, JPEGImages/), one class "tree"; returns ``root``."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for name, photo, boxes in read_photos():
        for (x, y), image, b in tiles(photo, boxes, tile):
            stem = f"{name}_{x:04d}_{y:04d}"
            image.save(root / "JPEGImages" / f"{stem}.png")
            objects = "".join(
                f"<object><name>tree</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin><xmax>{x2:.0f}</xmax><ymax>{y2:.0f}</ymax></bndbox></object>"
                for x1, y1, x2, y2 in b
            )
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><filename>{stem}.png</filename><size><width>{image.width}</width><height>{image.height}</height><depth>3</depth></size>{objects}</annotation>"
            )
    return root
