"""A tiny synthetic person re-ID data set in the Market-1501 layout, for the framework tests.

Shared by the integration tests (torchreid here; fast-reid and others can reuse it). No downloads:
the images are drawn with numpy and written as JPEGs with Pillow.

API::

    from reid_data import make_market1501, read_split, parse_name

    data = make_market1501(tmp_dir)      # or the session fixture ``market1501`` (conftest.py)
    data.root         # torchreid's ImageDataManager(root=...): holds market1501/
    data.dataset_dir  # root/market1501: fast-reid's dataset root (its Market1501 has dataset_dir '')
    data.data_dir     # dataset_dir/Market-1501-v15.09.15: the folders below
    data.train_dir    # bounding_box_train/  train_ids identities x cameras x images_per_camera
    data.query_dir    # query/               image 0 of every test identity in every camera
    data.gallery_dir  # bounding_box_test/   the other images of the test identities
    data.num_train_ids, data.num_cameras, data.size (H, W)
    data.split("train" | "query" | "gallery", relabel=False) -> [(path, pid, camid), ...]

    read_split(directory, relabel=False) -> [(path, pid, camid), ...]  sorted by file name
    parse_name("0001_c1s1_000151_00.jpg") -> (1, 0)                   (pid, 0-based camera)

File names follow Market-1501: ``{pid:04d}_c{camera}s1_{frame:06d}_00.jpg`` (camera 1-based in
the name, 0-based in the tuples, as torchreid and fast-reid convert it). Training identities are
1 .. train_ids, test identities follow (disjoint, as in Market-1501); ``relabel=True`` maps the
pids of a split to 0 .. n-1 in sorted order (torchreid's train labels). With two or more cameras,
every query has a gallery match from another camera, so CMC and mAP are defined.

The pictures can be learned: each identity has its own upper-body and lower-body colours and a
stripe pattern (a crude "person" on a noisy background); every image shifts the person by a few
pixels and adds noise, and each camera changes the brightness, so matching across cameras has to
look past the lighting.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAME = re.compile(r"^(-?\d+)_c(\d+)")
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def parse_name(name: str) -> tuple[int, int]:
    """(pid, 0-based camera) of a Market-1501 file name (its basename is used)."""
    match = NAME.match(Path(name).name)
    if match is None:
        raise ValueError(f"not a Market-1501 image name: {name!r}")
    return int(match.group(1)), int(match.group(2)) - 1


def read_split(directory, relabel: bool = False) -> list[tuple[str, int, int]]:
    """The images of one split folder as (path, pid, camid), sorted by file name."""
    items = [(str(p), *parse_name(p.name)) for p in sorted(Path(directory).glob("*.jpg"))]
    if relabel:
        label = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
        items = [(path, label[pid], cam) for path, pid, cam in items]
    return items


@dataclass(frozen=True)
class SyntheticMarket:
    root: Path
    num_train_ids: int
    num_test_ids: int
    num_cameras: int
    images_per_camera: int
    size: tuple[int, int]

    @property
    def dataset_dir(self) -> Path:
        return self.root / "market1501"

    @property
    def data_dir(self) -> Path:
        return self.dataset_dir / "Market-1501-v15.09.15"

    @property
    def train_dir(self) -> Path:
        return self.data_dir / SPLIT_DIRS["train"]

    @property
    def query_dir(self) -> Path:
        return self.data_dir / SPLIT_DIRS["query"]

    @property
    def gallery_dir(self) -> Path:
        return self.data_dir / SPLIT_DIRS["gallery"]

    def split(self, name: str, relabel: bool = False) -> list[tuple[str, int, int]]:
        return read_split(self.data_dir / SPLIT_DIRS[name], relabel=relabel)


def _colour(hue: float, value: float = 0.9) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.85, value)) * 255.0


def _person(pid: int, camera: int, index: int, total_ids: int, size: tuple[int, int],
            rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 picture of identity ``pid`` seen by ``camera``."""
    h, w = size
    # colours spread around the hue circle; the lower body uses another step so no two ids share both
    upper = _colour(pid / total_ids)
    lower = _colour(0.5 + 3 * pid / total_ids, value=0.6)
    stripes = 1 + pid % 3  # 1, 2 or 3 dark stripes across the upper body
    image = 90.0 + 25.0 * rng.standard_normal((h, w, 3))  # background
    dy, dx = rng.integers(-h // 16, h // 16 + 1), rng.integers(-w // 8, w // 8 + 1)
    top, bottom = h // 8 + dy, h - h // 16 + dy
    left, right = w // 4 + dx, w - w // 4 + dx
    waist = (top + bottom) // 2
    image[max(top, 0):waist, max(left, 0):right] = upper
    image[waist:bottom, max(left, 0):right] = lower
    band = max((waist - top) // (2 * stripes + 1), 1)
    for s in range(stripes):
        y = top + (2 * s + 1) * band
        image[max(y, 0):max(y + band, 0), max(left, 0):right] *= 0.45
    # head
    image[max(top - h // 8, 0):max(top, 0), w // 2 - w // 8 + dx:w // 2 + w // 8 + dx] = (224, 180, 150)
    image *= (1.1, 0.8, 1.0, 0.9, 1.2, 0.7)[camera % 6]  # each camera its own brightness
    image += 12.0 * rng.standard_normal((h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_market1501(
    root,
    *,
    train_ids: int = 8,
    test_ids: int = 8,
    cameras: int = 2,
    images_per_camera: int = 4,
    size: tuple[int, int] = (64, 32),
    seed: int = 0,
) -> SyntheticMarket:
    """Write the data set under ``root`` (created if needed) and describe it (module docstring)."""
    from PIL import Image

    if cameras < 2 or images_per_camera < 2:
        raise ValueError("need cameras >= 2 and images_per_camera >= 2 for query/gallery matches")
    data = SyntheticMarket(Path(root), train_ids, test_ids, cameras, images_per_camera, tuple(size))
    for folder in (data.train_dir, data.query_dir, data.gallery_dir):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = train_ids + test_ids
    for pid in range(1, total + 1):
        for camera in range(cameras):
            for index in range(images_per_camera):
                if pid <= train_ids:
                    folder = data.train_dir
                else:
                    folder = data.query_dir if index == 0 else data.gallery_dir
                frame = 1000 * camera + 25 * index + pid
                name = f"{pid:04d}_c{camera + 1}s1_{frame:06d}_00.jpg"
                picture = _person(pid, camera, index, total, data.size, rng)
                Image.fromarray(picture).save(folder / name, quality=95)
    return data
