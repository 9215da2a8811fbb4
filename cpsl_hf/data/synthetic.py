"""The built-in synthetic domain shift: street scenes rendered in a "source" and a "target" look.

A user without GTA5, SYNTHIA or Cityscapes still gets a real unsupervised domain adaptation problem:

- ``source``: a flat, rendered look (saturated colours per class, mild texture, crisp edges), with the class
  frequencies of a game engine's city (many buildings, few people), like GTA5.
- ``target``: a camera look (another palette and white balance, lower contrast, blur, sensor noise,
  vignetting, a lighting gradient, haze) and a greener, busier street (more vegetation, cars and people,
  fewer buildings), like Cityscapes.

Every image is a perspective street: a ground plane (road with lane markings, sidewalks, terrain strips),
facades along both sides (buildings with windows, tree lines), walls and fences at the sidewalk's edge,
poles carrying traffic signs and lights, trees, and objects standing on the ground at a depth ``Z``
(cars, trucks, buses, trams, people, riders on bicycles or motorcycles) scaled by ``f / Z``. Vehicles and
clothes take random colours in both domains, so those classes must be recognised by shape and context.

A harder variant (``variant="hard"``) keeps the source and changes the target's thin structures and small
vehicles most: poles darker and thinner, traffic-light housings light instead of dark, sign faces white instead
of yellow, fences dark, bicycles and motorcycles in dark matte paint. It exists to study what self-training does
to the classes the warm-up knows only a little (confirmation bias) and whether class balance protects them.

Labels are the 19 Cityscapes train ids (:data:`cpsl_hf.data.protocols.CITYSCAPES_CLASSES`); nothing is
ignored (255) except what the caller masks later. Generation is deterministic given
``(seed, domain, split, index)``: each image draws from its own ``numpy`` generator, so splits never share a
scene and any image can be regenerated alone. Each layer is drawn as an array mask over its bounding box;
no Python loop visits pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cpsl_hf.utils import atomic_directory

from .protocols import CITYSCAPES_CLASSES

#: Bump when the drawing code changes in a way the parameters below do not capture (invalidates caches).
GENERATOR_VERSION = "7"  # 7: images stored as uncompressed PNG (decoded 2-3x faster)

DOMAINS = ("source", "target")
VARIANTS = ("default", "hard")
SPLITS = ("train", "validation")
DEFAULT_NUM_IMAGES = {"train": 400, "validation": 100}
MIN_IMAGE_SIZE = (32, 64)

# Train ids of the 19 classes, by name.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
NUM_CLASSES = len(CITYSCAPES_CLASSES)

_DOMAIN_CODE = {"source": 1, "target": 2}
_SPLIT_CODE = {"train": 11, "validation": 12}


@dataclass(frozen=True)
class DomainStyle:
    """Everything that makes one domain look and feel different from the other.

    Colours are RGB in [0, 255]; ``class_colors[c]`` is the mean colour of class ``c`` (vehicles and
    clothes ignore it: they draw random colours), ``color_jitter`` the per-instance standard deviation.
    Counts are Poisson means per image; facade probabilities choose what lines each stretch of street.
    """

    class_colors: tuple[tuple[float, float, float], ...]
    color_jitter: float
    texture: tuple[float, ...]  # per-class amplitude of the fine multiplicative texture
    vegetation_blotch: float  # amplitude of the coarse leafy texture on vegetation and terrain
    facade_probs: tuple[float, float, float]  # building, tree line, open (terrain + sky)
    terrain_strip_prob: float
    barrier_prob: float  # probability that a stretch of street has a wall or fence at the sidewalk's edge
    counts: dict = field(default_factory=dict)
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    contrast: float = 1.0
    gamma: float = 1.0
    saturation: float = 1.0
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    vignetting: float = 0.0
    light_gradient: float = 0.0
    haze: float = 0.0
    haze_color: tuple[float, float, float] = (200.0, 200.0, 200.0)
    pole_width: float = 1.0  # multiplier of the poles' width
    cycle_paint: tuple[float, float, float] | None = None  # bicycles / motorcycles: this paint (else random)


_SOURCE_COLORS = (
    (95, 80, 115),  # road: purple-grey asphalt
    (215, 120, 200),  # sidewalk: pink paving
    (140, 110, 80),  # building
    (190, 180, 130),  # wall
    (165, 140, 110),  # fence
    (150, 150, 160),  # pole
    (60, 60, 40),  # traffic light housing
    (235, 215, 40),  # traffic sign
    (50, 150, 40),  # vegetation
    (160, 200, 90),  # terrain
    (80, 150, 240),  # sky
    (0, 0, 0),  # person (random clothes)
    (0, 0, 0),  # rider (random clothes)
    (0, 0, 0),  # car (random paint)
    (0, 0, 0),  # truck (random paint)
    (0, 0, 0),  # bus (random paint)
    (200, 40, 40),  # train (tram)
    (0, 0, 0),  # motorcycle (random paint)
    (0, 0, 0),  # bicycle (random paint)
)

_TARGET_COLORS = (
    (125, 120, 115),  # road: grey asphalt
    (170, 150, 145),  # sidewalk: grey-beige slabs
    (150, 145, 140),  # building: grey concrete
    (160, 150, 120),  # wall
    (120, 130, 110),  # fence
    (110, 110, 100),  # pole
    (40, 45, 40),  # traffic light housing
    (200, 190, 90),  # traffic sign
    (85, 115, 60),  # vegetation
    (140, 150, 90),  # terrain
    (175, 195, 215),  # sky: pale overcast
    (0, 0, 0),
    (0, 0, 0),
    (0, 0, 0),
    (0, 0, 0),
    (0, 0, 0),
    (170, 170, 60),  # train (tram)
    (0, 0, 0),
    (0, 0, 0),
)

#: How far each target class colour moves from the source colour towards the camera palette above (0..1).
TARGET_PALETTE_SHIFT = 0.4
_TARGET_COLORS = tuple(
    tuple(float(round(s + TARGET_PALETTE_SHIFT * (t - s))) for s, t in zip(source, camera))
    for source, camera in zip(_SOURCE_COLORS, _TARGET_COLORS)
)

_SOURCE_TEXTURE = (0.04, 0.05, 0.05, 0.05, 0.04, 0.02, 0.02, 0.02, 0.10, 0.08, 0.01) + (0.03,) * 8
_TARGET_TEXTURE = (0.08, 0.08, 0.08, 0.08, 0.06, 0.04, 0.04, 0.04, 0.16, 0.14, 0.02) + (0.05,) * 8

STYLES: dict[str, DomainStyle] = {
    "source": DomainStyle(
        class_colors=_SOURCE_COLORS,
        color_jitter=14.0,
        texture=_SOURCE_TEXTURE,
        vegetation_blotch=0.25,
        facade_probs=(0.70, 0.15, 0.15),
        terrain_strip_prob=0.35,
        barrier_prob=0.45,
        counts={
            "car": 2.5,
            "truck": 0.5,
            "bus": 0.35,
            "train": 0.12,
            "person": 2.5,
            "cyclist": 1.2,
            "pole": 2.5,
            "tree": 0.6,
        },
    ),
    "target": DomainStyle(
        class_colors=_TARGET_COLORS,
        color_jitter=18.0,
        texture=_TARGET_TEXTURE,
        vegetation_blotch=0.35,
        facade_probs=(0.40, 0.40, 0.20),
        terrain_strip_prob=0.45,
        barrier_prob=0.45,
        counts={
            "car": 4.5,
            "truck": 0.3,
            "bus": 0.25,
            "train": 0.1,
            "person": 6.0,
            "cyclist": 2.0,
            "pole": 3.0,
            "tree": 1.8,
        },
        white_balance=(1.08, 1.0, 0.86),
        contrast=0.85,
        gamma=1.15,
        saturation=0.9,
        blur_sigma=0.6,
        noise_sigma=5.0,
        vignetting=0.35,
        light_gradient=0.25,
        haze=0.1,
        haze_color=(205, 205, 200),
    ),
}


# The harder target: the same camera look and street, but thin structures and small vehicles look unlike the
# source's (colours the source never shows them in, thinner poles, dark matte two-wheelers).
_HARD_TARGET_COLORS = list(STYLES["target"].class_colors)
_HARD_TARGET_COLORS[POLE] = (70.0, 85.0, 75.0)  # dark green-grey masts (source: light grey)
_HARD_TARGET_COLORS[LIGHT] = (160.0, 160.0, 150.0)  # light housings (source: dark)
_HARD_TARGET_COLORS[SIGN] = (225.0, 225.0, 220.0)  # white faces (source: yellow)
_HARD_TARGET_COLORS[FENCE] = (70.0, 60.0, 55.0)  # dark fences (source: tan)

VARIANT_STYLES: dict[str, dict[str, DomainStyle]] = {
    "default": STYLES,
    "hard": {
        "source": STYLES["source"],
        "target": replace(
            STYLES["target"],
            class_colors=tuple(_HARD_TARGET_COLORS),
            pole_width=0.6,
            cycle_paint=(35.0, 35.0, 40.0),
        ),
    },
}
"""The domain styles of each variant of the shift."""


# --------------------------------------------------------------------------------------------------------
# Drawing primitives: each paints one class and one colour into the label map and the colour image, over
# the shape's bounding box only.
# --------------------------------------------------------------------------------------------------------


class _Canvas:
    """Label map ``H x W`` (uint8 train ids) and colour image ``H x W x 3`` (float32) painted back to front."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.label = np.full((height, width), SKY, dtype=np.uint8)
        self.color = np.zeros((height, width, 3), dtype=np.float32)

    def _box(self, y0: float, y1: float, x0: float, x1: float):
        """Integer bounding box clipped to the image, at least one pixel wide and tall; None if outside."""
        top, bottom = int(np.floor(y0)), max(int(np.ceil(y1)), int(np.floor(y0)) + 1)
        left, right = int(np.floor(x0)), max(int(np.ceil(x1)), int(np.floor(x0)) + 1)
        top, bottom = max(top, 0), min(bottom, self.height)
        left, right = max(left, 0), min(right, self.width)
        if top >= bottom or left >= right:
            return None
        return top, bottom, left, right

    def paint(self, box, mask, class_id: int, color) -> None:
        top, bottom, left, right = box
        self.label[top:bottom, left:right][mask] = class_id
        self.color[top:bottom, left:right][mask] = color

    def rect(self, y0, y1, x0, x1, class_id, color) -> None:
        box = self._box(y0, y1, x0, x1)
        if box is not None:
            top, bottom, left, right = box
            self.label[top:bottom, left:right] = class_id
            self.color[top:bottom, left:right] = color

    def ellipse(self, cy, cx, ry, rx, class_id, color, inner: float = 0.0) -> None:
        """Filled ellipse; with ``inner`` in (0, 1), a ring whose hole has radii ``inner * (ry, rx)``."""
        ry, rx = max(ry, 0.5), max(rx, 0.5)
        box = self._box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
        if box is None:
            return
        top, bottom, left, right = box
        ys = (np.arange(top, bottom, dtype=np.float32)[:, None] + 0.5 - cy) / ry
        xs = (np.arange(left, right, dtype=np.float32)[None, :] + 0.5 - cx) / rx
        radius2 = ys * ys + xs * xs
        mask = radius2 <= 1.0
        if inner > 0:
            mask &= radius2 >= inner * inner
        if not mask.any():  # sub-pixel shapes still leave one pixel
            mask = np.zeros_like(mask)
            mask[
                np.clip(int(cy) - top, 0, mask.shape[0] - 1), np.clip(int(cx) - left, 0, mask.shape[1] - 1)
            ] = True
        self.paint(box, mask, class_id, color)

    def triangle(self, cy, cx, radius, class_id, color) -> None:
        """Upward equilateral-ish triangle centred on (cy, cx)."""
        radius = max(radius, 0.75)
        box = self._box(cy - radius, cy + radius, cx - radius, cx + radius)
        if box is None:
            return
        top, bottom, left, right = box
        ys = (np.arange(top, bottom, dtype=np.float32)[:, None] + 0.5 - (cy - radius)) / (2 * radius)
        xs = np.abs(np.arange(left, right, dtype=np.float32)[None, :] + 0.5 - cx) / radius
        self.paint(box, (xs <= ys + 0.15) & (ys <= 1.0), class_id, color)

    def segment(self, p0, p1, thickness, class_id, color) -> None:
        """Thick line segment from ``p0 = (y, x)`` to ``p1``."""
        half = max(thickness / 2, 0.5)
        (y0, x0), (y1, x1) = p0, p1
        box = self._box(
            min(y0, y1) - half, max(y0, y1) + half + 1, min(x0, x1) - half, max(x0, x1) + half + 1
        )
        if box is None:
            return
        top, bottom, left, right = box
        ys = np.arange(top, bottom, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(left, right, dtype=np.float32)[None, :] + 0.5
        dy, dx = y1 - y0, x1 - x0
        length2 = max(dy * dy + dx * dx, 1e-6)
        t = np.clip(((ys - y0) * dy + (xs - x0) * dx) / length2, 0.0, 1.0)
        dist2 = (ys - (y0 + t * dy)) ** 2 + (xs - (x0 + t * dx)) ** 2
        self.paint(box, dist2 <= half * half + 0.25, class_id, color)


# --------------------------------------------------------------------------------------------------------
# The scene
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Camera:
    """Pinhole camera over a flat ground: ground point (X lateral, Z depth) -> pixel."""

    focal: float  # pixels
    height_m: float  # camera height above the ground
    horizon: float  # image row of the horizon
    center_x: float  # image column of the vanishing point

    def project(self, lateral, depth, height_m=0.0):
        """Pixel (y, x) of a point ``height_m`` above the ground at (lateral, depth) metres."""
        y = self.horizon + self.focal * (self.height_m - height_m) / depth
        x = self.center_x + self.focal * lateral / depth
        return y, x


def _color(rng, style: DomainStyle, class_id: int, jitter_scale: float = 1.0) -> np.ndarray:
    base = np.asarray(style.class_colors[class_id], dtype=np.float32)
    jitter = rng.normal(0.0, style.color_jitter * jitter_scale, size=3) + rng.normal(0.0, style.color_jitter)
    return np.clip(base + jitter, 0, 255).astype(np.float32)


def _random_paint(rng) -> np.ndarray:
    """Vehicle paint / clothes: any hue, biased to the greys, whites and blacks of real traffic."""
    if rng.random() < 0.45:
        return np.full(3, rng.uniform(20, 235), dtype=np.float32) + rng.normal(0, 6, 3).astype(np.float32)
    return rng.uniform(20, 235, size=3).astype(np.float32)


def _segments(rng, z_start: float, z_end: float, mean_length: float):
    """Breakpoints splitting the depth range [z_start, z_end] into stretches of random length."""
    lengths = rng.uniform(0.4, 1.6, size=64) * mean_length
    breaks = z_start + np.cumsum(lengths)
    return breaks[breaks < z_end]


def _draw_background(canvas: _Canvas, camera: _Camera, rng, style: DomainStyle, layout: dict) -> None:
    """Sky, distant skyline, ground plane (road, lanes, sidewalks, terrain) and the facades on both sides."""
    height, width = canvas.height, canvas.width
    rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(width, dtype=np.float32)[None, :] + 0.5

    # Sky: a vertical gradient.
    sky = _color(rng, style, SKY, 0.5)
    shade = (0.85 + 0.3 * rows / max(camera.horizon, 1.0))[..., None].clip(0.85, 1.15)
    canvas.color[:] = (sky * shade).astype(np.float32)
    canvas.label[:] = SKY

    # Distant skyline at the end of the street: blocks of random height around the horizon.
    far_depth = 150.0
    edges = np.sort(rng.uniform(0, width, size=int(rng.integers(4, 10))))
    block = np.searchsorted(edges, cols[0])
    block_height = rng.uniform(6, 40, size=len(edges) + 1)
    block_kind = np.where(
        rng.random(len(edges) + 1) < style.facade_probs[0] / sum(style.facade_probs[:2]), BUILDING, VEGETATION
    )
    top = camera.horizon - camera.focal * (block_height[block] - camera.height_m) / far_depth
    skyline = (rows >= top[None, :]) & (rows < camera.horizon + 1)
    block_colors = np.stack([_color(rng, style, int(kind)) for kind in block_kind])
    canvas.label[skyline] = np.broadcast_to(block_kind[block][None, :], skyline.shape)[skyline]
    canvas.color[skyline] = np.broadcast_to(block_colors[block][None, :, :], (*skyline.shape, 3))[skyline]

    # Ground plane: every pixel below the horizon is a ground point (lateral, depth).
    below = np.broadcast_to(rows > camera.horizon + 0.5, (height, width))
    depth = np.where(below, camera.focal * camera.height_m / np.maximum(rows - camera.horizon, 0.5), 1e6)
    lateral = (cols - camera.center_x) * depth / camera.focal
    road = layout["road"]
    ground = np.full((height, width), TERRAIN, dtype=np.uint8)
    for side, sign in (("left", -1.0), ("right", 1.0)):
        outward = sign * lateral  # metres away from the road's centre line on this side
        on_side = outward >= 0
        strip = layout[side]
        stretch = np.searchsorted(strip["breaks"], depth)
        terrain_strip = strip["terrain_strip"][stretch]
        ground[on_side & (outward < strip["sidewalk"])] = SIDEWALK
        beyond = on_side & (outward >= strip["sidewalk"]) & (outward < strip["facade"])
        ground[beyond & ~terrain_strip] = SIDEWALK
        ground[on_side & (outward < road[side])] = ROAD
    ground_colors = np.stack([_color(rng, style, c, 0.6) for c in range(NUM_CLASSES)])
    ground_color = ground_colors[ground]
    # Lane markings (road class, painted white): dashed lines between lanes, solid at the road edges.
    lanes = layout["lane_lines"]
    marking = np.zeros((height, width), dtype=bool)
    line_width = 0.12
    for lane_x in lanes:
        marking |= (np.abs(lateral - lane_x) < line_width) & ((depth % 9.0) < 4.0)
    for side, sign in (("left", -1.0), ("right", 1.0)):
        marking |= np.abs(sign * lateral - (road[side] - 0.3)) < line_width
    marking &= below & (ground == ROAD)
    ground_color[marking] = np.float32(225) + rng.normal(0, 8, 3).astype(np.float32)
    # Paving joints on sidewalks (a faint grid) make them look different from asphalt.
    joints = (ground == SIDEWALK) & (((depth % 1.5) < 0.12) | ((np.abs(lateral) % 1.5) < 0.1))
    ground_color[joints] *= 0.8
    canvas.label[below] = ground[below]
    canvas.color[below] = ground_color[below]

    # Facades: vertical planes at |lateral| = facade distance, split in stretches along the depth.
    for side, sign in (("left", -1.0), ("right", 1.0)):
        strip = layout[side]
        offset = sign * (cols[0] - camera.center_x)  # pixels from the vanishing point, outward
        visible = offset > 0.5
        plane_depth = np.where(visible, camera.focal * strip["facade"] / np.maximum(offset, 0.5), 1e6)
        stretch = np.searchsorted(strip["breaks"], plane_depth)
        kind = strip["kind"][stretch]
        top_m = strip["height"][stretch] + strip["bumps"][stretch] * np.sin(plane_depth * strip["bump_freq"])
        top = camera.horizon - camera.focal * (top_m - camera.height_m) / plane_depth
        bottom = camera.horizon + camera.focal * camera.height_m / plane_depth
        inside = (rows >= top[None, :]) & (rows < bottom[None, :]) & visible[None, :]
        for class_id in (BUILDING, VEGETATION):
            mask = inside & (kind == class_id)[None, :]
            if not mask.any():
                continue
            colors = strip["colors"][stretch]
            canvas.label[mask] = class_id
            canvas.color[mask] = np.broadcast_to(colors[None, :, :], (height, width, 3))[mask]
            if class_id == BUILDING:
                # Windows: a grid of darker panes in floors of 3 m and bays of 2.5 m along the facade.
                height_m = camera.height_m + (camera.horizon - rows) * plane_depth[None, :] / camera.focal
                along = plane_depth[None, :]
                window = ((height_m % 3.0) > 1.2) & ((height_m % 3.0) < 2.4) & ((along % 2.5) < 1.3)
                window &= mask & (height_m > 1.0) & (height_m < top_m[None, :] - 1.0)
                canvas.color[window] = canvas.color[window] * 0.45 + np.float32(
                    style.class_colors[SKY][2] * 0.15
                )

        # Walls and fences at the sidewalk's outer edge (the facade line), in front of the facade.
        barrier_kind = strip["barrier"][stretch]
        barrier_top = camera.horizon - camera.focal * (strip["barrier_height"][stretch] - camera.height_m) / (
            plane_depth
        )
        barrier = (rows >= barrier_top[None, :]) & (rows < bottom[None, :]) & visible[None, :]
        for class_id in (WALL, FENCE):
            mask = barrier & (barrier_kind == class_id)[None, :]
            if not mask.any():
                continue
            colors = strip["barrier_colors"][stretch]
            canvas.label[mask] = class_id
            canvas.color[mask] = np.broadcast_to(colors[None, :, :], (height, width, 3))[mask]
            if class_id == FENCE:  # pickets: dark gaps every 0.3 m along the fence
                gaps = mask & ((plane_depth[None, :] % 0.6) < 0.3)
                canvas.color[gaps] *= 0.4
            else:  # wall: a lighter coping along the top
                coping = mask & (rows < barrier_top[None, :] + 1.5)
                canvas.color[coping] = canvas.color[coping] * 0.6 + 90


def _make_layout(rng, camera: _Camera, style: DomainStyle) -> dict:
    """Road widths, lane lines and, for each side, the stretches of facade, terrain and barriers."""
    layout = {"road": {"left": rng.uniform(3.0, 7.5), "right": rng.uniform(3.0, 7.5)}}
    lanes = np.arange(-layout["road"]["left"] + 3.2, layout["road"]["right"] - 1.0, 3.2)
    layout["lane_lines"] = lanes
    z_near = camera.focal * camera.height_m / max(camera.horizon, 1.0)
    for side in ("left", "right"):
        sidewalk = layout["road"][side] + rng.uniform(1.8, 4.5)
        facade = sidewalk + rng.uniform(0.0, 3.5)
        breaks = _segments(rng, z_near * 0.5, 200.0, rng.uniform(10, 30))
        count = len(breaks) + 1
        probs = np.asarray(style.facade_probs, dtype=np.float64)
        kind = rng.choice(np.array([BUILDING, VEGETATION, SKY]), size=count, p=probs / probs.sum())
        height = np.where(kind == BUILDING, rng.uniform(7, 30, count), rng.uniform(4, 12, count))
        bumps = np.where(kind == VEGETATION, rng.uniform(0.8, 2.0, count), 0.0)
        colors = np.stack(
            [_color(rng, style, int(k)) if k != SKY else np.zeros(3, np.float32) for k in kind]
        ).astype(np.float32)
        barrier = np.where(rng.random(count) < style.barrier_prob, rng.choice([WALL, FENCE], size=count), SKY)
        barrier_height = rng.uniform(1.5, 3.0, count)
        barrier_colors = np.stack(
            [_color(rng, style, int(b)) if b != SKY else np.zeros(3, np.float32) for b in barrier]
        ).astype(np.float32)
        layout[side] = {
            "sidewalk": sidewalk,
            "facade": facade,
            "breaks": breaks,
            "kind": kind,
            "height": height,
            "bumps": bumps,
            "bump_freq": rng.uniform(0.8, 2.5),
            "colors": colors,
            "terrain_strip": (rng.random(count) < style.terrain_strip_prob) | (kind == VEGETATION),
            "barrier": barrier,
            "barrier_height": barrier_height,
            "barrier_colors": barrier_colors,
        }
    return layout


# Objects standing on the ground, drawn far to near. Each takes (canvas, camera, rng, style, lateral, depth).


def _draw_car(canvas, camera, rng, style, lateral, depth, kind=CAR):
    scale = camera.focal / depth
    base_y, center_x = camera.project(lateral, depth)
    paint = _random_paint(rng)
    if kind == CAR:
        width, height, body = rng.uniform(1.6, 2.0), rng.uniform(1.35, 1.7), rng.uniform(0.55, 0.7)
    elif kind == TRUCK:
        width, height, body = rng.uniform(2.3, 2.6), rng.uniform(3.0, 3.9), 0.9
    else:  # bus
        width, height, body = rng.uniform(2.45, 2.6), rng.uniform(3.0, 3.4), 0.35
    half = width / 2 * scale
    top = base_y - height * scale
    clearance = base_y - 0.3 * scale
    # wheels (dark, same class)
    tyre = np.float32([25, 25, 28])
    canvas.rect(base_y - 0.55 * scale, base_y, center_x - half, center_x - half + 0.35 * scale, kind, tyre)
    canvas.rect(base_y - 0.55 * scale, base_y, center_x + half - 0.35 * scale, center_x + half, kind, tyre)
    if kind == CAR:
        cabin_bottom = base_y - (height * body) * scale
        canvas.rect(cabin_bottom, clearance, center_x - half, center_x + half, kind, paint)
        canvas.rect(top, cabin_bottom, center_x - half * 0.8, center_x + half * 0.8, kind, paint * 0.9)
        glass = np.float32([60, 70, 85]) + rng.normal(0, 8, 3).astype(np.float32)
        canvas.rect(
            top + 0.1 * scale,
            cabin_bottom - 0.05 * scale,
            center_x - half * 0.7,
            center_x + half * 0.7,
            kind,
            glass,
        )
        lamp = np.float32([200, 30, 30])
        lamp_y = cabin_bottom + 0.15 * scale
        canvas.rect(lamp_y, lamp_y + 0.15 * scale, center_x - half * 0.95, center_x - half * 0.7, kind, lamp)
        canvas.rect(lamp_y, lamp_y + 0.15 * scale, center_x + half * 0.7, center_x + half * 0.95, kind, lamp)
    elif kind == TRUCK:
        canvas.rect(top, clearance, center_x - half, center_x + half, kind, paint)
        seam = paint * 0.6
        canvas.rect(top, clearance, center_x - 0.03 * scale, center_x + 0.03 * scale, kind, seam)
        canvas.rect(top + 0.1 * scale, top + 0.2 * scale, center_x - half, center_x + half, kind, seam)
        canvas.rect(clearance - 0.25 * scale, clearance, center_x - half, center_x + half, kind, tyre * 1.5)
    else:  # bus: tall box with a window band and a destination display
        canvas.rect(top, clearance, center_x - half, center_x + half, kind, paint)
        glass = np.float32([45, 55, 70])
        canvas.rect(
            top + 0.45 * scale, top + 1.6 * scale, center_x - half * 0.88, center_x + half * 0.88, kind, glass
        )
        canvas.rect(
            top + 0.1 * scale,
            top + 0.35 * scale,
            center_x - half * 0.5,
            center_x + half * 0.5,
            kind,
            np.float32([230, 170, 40]),
        )


def _draw_tram(canvas, camera, rng, style, lateral, depth):
    scale = camera.focal / depth
    base_y, center_x = camera.project(lateral, depth)
    half = 1.35 * scale
    top = base_y - 3.5 * scale
    paint = _color(rng, style, TRAIN)
    canvas.rect(top, base_y - 0.2 * scale, center_x - half, center_x + half, TRAIN, paint)
    canvas.rect(
        top + 0.9 * scale,
        top + 2.0 * scale,
        center_x - half * 0.85,
        center_x + half * 0.85,
        TRAIN,
        np.float32([50, 60, 70]),
    )
    canvas.rect(
        base_y - 0.9 * scale,
        base_y - 0.6 * scale,
        center_x - half,
        center_x + half,
        TRAIN,
        np.float32([235, 235, 230]),
    )
    # pantograph on the roof
    canvas.segment(
        (top, center_x - 0.4 * scale),
        (top - 0.9 * scale, center_x + 0.3 * scale),
        0.08 * scale,
        TRAIN,
        np.float32([40, 40, 40]),
    )


def _draw_person(canvas, camera, rng, lateral, depth, class_id=PERSON, seated=False):
    """A standing pedestrian, or (``seated``) a rider on a saddle: legs, torso, arms, head."""
    scale = camera.focal / depth
    base_y, center_x = camera.project(lateral, depth)
    tall = rng.uniform(1.55, 1.9)
    skin = np.float32(rng.choice([[225, 185, 160], [180, 130, 100], [110, 75, 55]])) + rng.normal(0, 6, 3)
    shirt, trousers = _random_paint(rng), _random_paint(rng)
    hip = base_y - 0.5 * tall * scale  # standing: legs are half the height; seated: on the saddle
    shoulder = hip - 0.32 * tall * scale
    half = 0.2 * scale
    if seated:  # thighs forward, shins down
        canvas.segment(
            (hip, center_x), (hip + 0.05 * scale, center_x + 0.35 * scale), 0.16 * scale, class_id, trousers
        )
        canvas.segment(
            (hip + 0.05 * scale, center_x + 0.35 * scale),
            (base_y, center_x + 0.3 * scale),
            0.14 * scale,
            class_id,
            trousers,
        )
    else:
        stride = rng.uniform(0.0, 0.15) * scale
        canvas.segment(
            (hip, center_x - 0.08 * scale),
            (base_y, center_x - 0.1 * scale - stride),
            0.15 * scale,
            class_id,
            trousers,
        )
        canvas.segment(
            (hip, center_x + 0.08 * scale),
            (base_y, center_x + 0.1 * scale + stride),
            0.15 * scale,
            class_id,
            trousers,
        )
    canvas.rect(shoulder, hip, center_x - half, center_x + half, class_id, shirt)
    canvas.segment(
        (shoulder + 0.05 * scale, center_x - half),
        (hip, center_x - half - 0.05 * scale),
        0.1 * scale,
        class_id,
        shirt * 0.9,
    )
    canvas.segment(
        (shoulder + 0.05 * scale, center_x + half),
        (hip, center_x + half + 0.05 * scale),
        0.1 * scale,
        class_id,
        shirt * 0.9,
    )
    head_r = 0.11 * scale
    canvas.ellipse(shoulder - head_r * 1.1, center_x, head_r * 1.2, head_r, class_id, skin)


def _draw_cyclist(canvas, camera, rng, style, lateral, depth):
    """A bicycle or motorcycle seen from the side, with its rider."""
    scale = camera.focal / depth
    base_y, center_x = camera.project(lateral, depth)
    motor = rng.random() < 0.45
    kind = MOTORCYCLE if motor else BICYCLE
    direction = 1.0 if rng.random() < 0.5 else -1.0
    radius = (0.32 if motor else 0.35) * scale
    gap = (0.7 if motor else 0.55) * scale
    if style.cycle_paint is None:
        paint = _random_paint(rng)
    else:
        paint = np.clip(np.asarray(style.cycle_paint) + rng.normal(0, 8, 3), 0, 255).astype(np.float32)
    tyre = np.float32([25, 25, 28])
    for offset in (-gap, gap):
        if motor:
            canvas.ellipse(base_y - radius, center_x + offset, radius, radius, kind, tyre)
            canvas.ellipse(
                base_y - radius, center_x + offset, radius * 0.45, radius * 0.45, kind, paint * 0.5
            )
        else:
            canvas.ellipse(base_y - radius, center_x + offset, radius, radius, kind, tyre, inner=0.6)
    hub_y = base_y - radius
    if motor:
        canvas.ellipse(hub_y - 0.35 * scale, center_x, 0.3 * scale, 0.6 * scale, kind, paint)
        canvas.rect(
            hub_y - 0.25 * scale,
            hub_y + 0.05 * scale,
            center_x - 0.3 * scale,
            center_x + 0.3 * scale,
            kind,
            np.float32([70, 70, 75]),
        )
    else:
        thickness = max(0.1 * scale, 1.0)
        seat = (hub_y - 0.5 * scale, center_x - direction * 0.1 * scale)
        bar = (hub_y - 0.6 * scale, center_x + direction * gap * 0.8)
        canvas.segment((hub_y, center_x - direction * gap), seat, thickness, kind, paint)
        canvas.segment(seat, (hub_y, center_x), thickness, kind, paint)
        canvas.segment((hub_y, center_x), (hub_y, center_x + direction * gap), thickness, kind, paint)
        canvas.segment(seat, bar, thickness, kind, paint)
        canvas.segment(bar, (hub_y, center_x + direction * gap), thickness, kind, paint)
    _draw_person(canvas, camera, rng, lateral, depth, class_id=RIDER, seated=True)  # over the bike's centre


def _draw_pole(canvas, camera, rng, style, lateral, depth):
    scale = camera.focal / depth
    base_y, center_x = camera.project(lateral, depth)
    tall = rng.uniform(4.0, 8.0)
    half = max(0.15 * scale * style.pole_width, 1.0 * style.pole_width)
    top = base_y - tall * scale
    canvas.rect(top, base_y, center_x - half, center_x + half, POLE, _color(rng, style, POLE))
    carries = rng.random()
    if carries < 0.4:  # traffic light: dark housing with three lamps, one lit
        housing = _color(rng, style, LIGHT, 0.5)
        y0 = top + rng.uniform(0.0, 0.5) * scale
        width = 0.6 * scale
        canvas.rect(y0, y0 + 1.5 * scale, center_x - width / 2, center_x + width / 2, LIGHT, housing)
        lit = int(rng.integers(0, 3))
        for lamp in range(3):
            bright = np.float32([[230, 40, 30], [240, 190, 30], [40, 220, 90]][lamp])
            color = bright if lamp == lit else housing * 1.6
            canvas.ellipse(
                y0 + (0.3 + 0.45 * lamp) * scale, center_x, 0.17 * scale, 0.17 * scale, LIGHT, color
            )
    elif carries < 0.85:  # traffic sign: disc, triangle or plate, at 2.2-3.5 m
        y = base_y - rng.uniform(2.2, 3.5) * scale
        radius = rng.uniform(0.45, 0.7) * scale
        face = _color(rng, style, SIGN)
        shape = rng.random()
        if shape < 0.4:
            canvas.ellipse(y, center_x, radius, radius, SIGN, np.float32([200, 30, 30]))
            canvas.ellipse(y, center_x, radius * 0.7, radius * 0.7, SIGN, face)
        elif shape < 0.7:
            canvas.triangle(y, center_x, radius * 1.1, SIGN, face)
        else:
            canvas.rect(
                y - radius,
                y + radius * 0.6,
                center_x - radius * 1.2,
                center_x + radius * 1.2,
                SIGN,
                np.float32([40, 90, 200]) if rng.random() < 0.5 else face,
            )


def _draw_tree(canvas, camera, rng, style, lateral, depth):
    scale = camera.focal / depth
    base_y, center_x = camera.project(lateral, depth)
    trunk = _color(rng, style, VEGETATION) * np.float32([1.3, 0.7, 0.5])
    crown_height = rng.uniform(2.5, 4.5)
    canvas.rect(
        base_y - crown_height * scale,
        base_y,
        center_x - 0.15 * scale,
        center_x + 0.15 * scale,
        VEGETATION,
        trunk,
    )
    leaves = _color(rng, style, VEGETATION)
    radius = rng.uniform(1.5, 3.0)
    for _ in range(3):
        dy, dx = rng.normal(0, 0.5, 2) * radius
        canvas.ellipse(
            base_y - (crown_height + radius * 0.8 + dy) * scale,
            center_x + dx * scale,
            radius * rng.uniform(0.6, 1.0) * scale,
            radius * rng.uniform(0.6, 1.0) * scale,
            VEGETATION,
            leaves * rng.uniform(0.85, 1.15),
        )


def _place_objects(rng, camera: _Camera, style: DomainStyle, layout: dict, image_size: tuple[int, int]):
    """A list of (depth, drawer, lateral) for the scene's objects, drawn far to near.

    Each object first gets its lateral position (lane, road edge, sidewalk), then a depth, log-uniform
    between the nearest depth at which it is still inside the image and ``far``.
    """
    height, width = image_size
    z_min = camera.focal * camera.height_m / max(height - camera.horizon, 1.0) * 1.15

    def place(laterals, far, drawer):
        laterals = np.asarray(laterals, dtype=np.float64)
        room = np.where(laterals < 0, camera.center_x, width - camera.center_x) * 0.9  # pixels to the edge
        nearest = np.maximum(z_min, np.abs(laterals) * camera.focal / np.maximum(room, 1.0))
        farthest = np.maximum(far, nearest * 1.5)
        depth = nearest * np.exp(rng.uniform(0, 1, size=len(laterals)) * np.log(farthest / nearest))
        items.extend((float(z), drawer, float(x)) for z, x in zip(depth, laterals))

    def sides(count):
        return np.where(rng.random(count) < 0.5, -1.0, 1.0)

    road = layout["road"]
    edge = {-1.0: road["left"], 1.0: road["right"]}
    walk = {-1.0: layout["left"]["sidewalk"], 1.0: layout["right"]["sidewalk"]}
    facade = {-1.0: layout["left"]["facade"], 1.0: layout["right"]["facade"]}
    items = []
    counts = {name: int(rng.poisson(mean)) for name, mean in style.counts.items()}
    drawers = {"car": _draw_car, "truck": _make_vehicle(TRUCK), "bus": _make_vehicle(BUS)}
    for name, drawer in drawers.items():
        place(rng.uniform(-road["left"] + 1.1, road["right"] - 1.1, counts[name]), 60.0, drawer)
    place(rng.uniform(-1.0, 1.0, counts["train"]), 60.0, _draw_tram)
    sign = sides(counts["cyclist"])
    place([s * (edge[s] - rng.uniform(0.6, 1.6)) for s in sign], 14.0, _draw_cyclist)
    sign = sides(counts["person"])
    place([s * rng.uniform(edge[s] + 0.4, walk[s] - 0.2) for s in sign], 14.0, _draw_pedestrian)
    sign = sides(counts["pole"] * 2)
    place([s * (edge[s] + 0.35) for s in sign], 35.0, _draw_pole)
    sign = sides(counts["tree"] * 2)
    place([s * rng.uniform(edge[s] + 0.8, facade[s] + 0.5) for s in sign], 60.0, _draw_tree)
    items.sort(key=lambda item: -item[0])
    return items


def _make_vehicle(kind):
    def draw(canvas, camera, rng, style, lateral, depth):
        _draw_car(canvas, camera, rng, style, lateral, depth, kind=kind)

    return draw


def _draw_pedestrian(canvas, camera, rng, style, lateral, depth):
    _draw_person(canvas, camera, rng, lateral, depth)


# --------------------------------------------------------------------------------------------------------
# Camera / rendering look
# --------------------------------------------------------------------------------------------------------


def _coarse_noise(rng, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise ``H x W`` in about [-1, 1]: a random grid of ``cell``-pixel spacing, bilinearly upsampled."""
    grid = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR)) * 0.6


def _finish(canvas: _Canvas, rng, style: DomainStyle, horizon: float) -> np.ndarray:
    """Texture, then the domain's photometric look -> uint8 image ``H x W x 3``."""
    height, width = canvas.height, canvas.width
    label = canvas.label
    image = canvas.color
    fine = rng.standard_normal((height, width)).astype(np.float32)
    amplitude = np.asarray(style.texture, dtype=np.float32)[label]
    leafy = np.isin(label, (VEGETATION, TERRAIN))
    blotch = _coarse_noise(rng, height, width, 3) * style.vegetation_blotch * leafy
    image = image * (1.0 + amplitude * fine + blotch)[..., None]

    if style.saturation != 1.0:
        grey = image.mean(axis=2, keepdims=True)
        image = grey + (image - grey) * style.saturation
    image = image * np.asarray(style.white_balance, dtype=np.float32)
    if style.haze > 0:  # haze thickens towards the horizon band, where the scene is far away
        rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        fog = style.haze * rng.uniform(0.5, 1.0) * np.exp(-(((rows - horizon / height) / 0.18) ** 2))
        image = image * (1 - fog) + np.asarray(style.haze_color, dtype=np.float32) * fog
    if style.light_gradient > 0:
        direction = rng.uniform(-1, 1)
        cols = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
        image = image * (1.0 + style.light_gradient * direction * cols)
    if style.vignetting > 0:
        ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None, None]
        xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
        image = image * (1.0 - style.vignetting * 0.5 * (xs * xs + ys * ys))
    if style.contrast != 1.0 or style.gamma != 1.0:
        normalised = np.clip(image / 255.0, 0, 1) ** style.gamma
        image = (0.5 + (normalised - 0.5) * style.contrast) * 255.0
    if style.blur_sigma > 0:
        blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(style.blur_sigma)
        )
        image = np.asarray(blurred, dtype=np.float32)
    if style.noise_sigma > 0:
        image = image + rng.normal(0, style.noise_sigma, size=image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_scene(
    domain: str, image_size: tuple[int, int], rng: np.random.Generator, variant: str = "default"
):
    """Render one street scene of ``domain`` in ``variant`` of the shift.

    Returns ``(image, label)``: uint8 ``H x W x 3`` RGB and uint8 ``H x W`` train ids (0..18).
    """
    style = VARIANT_STYLES[variant][domain]
    height, width = image_size
    camera = _Camera(
        focal=1.2 * width,
        height_m=rng.uniform(1.3, 1.8),
        horizon=rng.uniform(0.34, 0.46) * height,
        center_x=rng.uniform(0.38, 0.62) * width,
    )
    canvas = _Canvas(height, width)
    layout = _make_layout(rng, camera, style)
    _draw_background(canvas, camera, rng, style, layout)
    for depth, drawer, lateral in _place_objects(rng, camera, style, layout, (height, width)):
        drawer(canvas, camera, rng, style, lateral, depth)
    image = _finish(canvas, rng, style, camera.horizon)
    return image, canvas.label.copy()


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def _check_arguments(domain, split, num_images, image_size, seed, variant="default"):
    if variant not in VARIANTS:
        raise ValueError(f"load_synthetic: unknown variant={variant!r}; expected one of {VARIANTS}")
    if domain not in DOMAINS:
        raise ValueError(f"load_synthetic: unknown domain={domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"load_synthetic: unknown split={split!r}; expected one of {SPLITS}")
    if num_images is not None and (not isinstance(num_images, (int, np.integer)) or num_images < 1):
        raise ValueError(f"load_synthetic: num_images={num_images!r} must be a positive integer or None")
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(side, (int, np.integer)) for side in image_size)
    ):
        raise ValueError(
            f"load_synthetic: image_size={image_size!r} must be a pair of integers (height, width)"
        )
    if image_size[0] < MIN_IMAGE_SIZE[0] or image_size[1] < MIN_IMAGE_SIZE[1]:
        raise ValueError(
            f"load_synthetic: image_size={tuple(image_size)} is too small to draw the scene's objects; "
            f"need at least {MIN_IMAGE_SIZE} (height, width)"
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"load_synthetic: seed={seed!r} must be a non-negative integer")


def generator_fingerprint(
    domain: str, split: str, num_images: int, image_size, seed: int, variant: str = "default"
) -> str:
    """A short hash of everything the generated data depends on (the cache key)."""
    description = {
        "version": GENERATOR_VERSION,
        "style": asdict(VARIANT_STYLES[variant][domain]),
        "variant": variant,
        "domain": domain,
        "split": split,
        "num_images": int(num_images),
        "image_size": [int(side) for side in image_size],
        "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def generate_synthetic(
    domain: str, split: str, num_images: int, image_size, seed: int, variant: str = "default"
):
    """Generate the arrays of one split: ``(images N x H x W x 3 uint8, labels N x H x W uint8, names)``.

    The ``hard`` variant draws from the same random streams in its own target style (its source equals the
    default's); its names carry the variant (``synthetic-hard_target_...``)."""
    prefix = "synthetic" if variant == "default" else f"synthetic-{variant}"
    height, width = int(image_size[0]), int(image_size[1])
    images = np.empty((num_images, height, width, 3), dtype=np.uint8)
    labels = np.empty((num_images, height, width), dtype=np.uint8)
    names = []
    for index in range(num_images):
        rng = np.random.default_rng([int(seed), _DOMAIN_CODE[domain], _SPLIT_CODE[split], index])
        images[index], labels[index] = render_scene(domain, (height, width), rng, variant)
        names.append(f"{prefix}_{domain}_{split}_s{seed}_{index:05d}")
    return images, labels, names


def _png_bytes(array: np.ndarray, compress_level: int) -> bytes:
    """Lossless PNG bytes of an ``H x W x 3`` RGB or ``H x W`` "L" uint8 array at zlib ``compress_level``."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


#: Images are stored uncompressed (level 0): the camera-look noise compresses to only ~70% anyway, and inflating
#: it was most of the training loader's time (1.9 ms against 0.7 ms per 128 x 256 image on the 2-core CPU; see
#: BENCHMARKS.md). Label maps compress ~20x at level 1 and decode in ~0.2 ms either way.
IMAGE_PNG_LEVEL, LABEL_PNG_LEVEL = 0, 1


def default_cache_dir() -> Path:
    """``$CPSL_HF_CACHE/synthetic`` if set, else ``~/.cache/cpsl_hf/synthetic``."""
    root = os.environ.get("CPSL_HF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "cpsl_hf") / "synthetic"


def _is_saved_dataset(folder: Path) -> bool:
    """True when ``folder`` holds a split saved by ``save_to_disk`` (folders only appear complete: renamed)."""
    return (folder / "dataset_info.json").is_file()


def load_synthetic(
    domain: str = "source",
    split: str = "train",
    num_images: int | None = None,
    image_size: tuple[int, int] = (128, 256),
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    variant: str = "default",
):
    """The built-in synthetic domain shift as a ``datasets.Dataset``.

    Args:
        domain: ``"source"`` (rendered look, GTA5-like class frequencies) or ``"target"`` (camera look,
            Cityscapes-like frequencies).
        split: ``"train"`` or ``"validation"``; the splits are generated from disjoint random streams.
        num_images: images in the split; default 400 for ``train``, 100 for ``validation``.
        image_size: ``(height, width)`` of every image, at least 32 x 64.
        seed: base seed; the same seed gives byte-identical data.
        cache_dir: where generated splits are saved (``save_to_disk``), one folder per parameter hash;
            default :func:`default_cache_dir`. A changed parameter or generator version regenerates.
        variant: ``"default"`` (the demo's shift) or ``"hard"`` (the target's thin structures and small
            vehicles look unlike the source's; see the module docstring).

    Returns:
        ``datasets.Dataset`` with columns ``image`` (PIL RGB, ``H x W``), ``label`` (PIL "L", 19-class
        Cityscapes train ids) and ``name`` (str).
    """
    import datasets

    _check_arguments(domain, split, num_images, image_size, seed, variant)
    num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
    key = generator_fingerprint(domain, split, num_images, image_size, seed, variant)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{domain}-{split}-{key}"
    if _is_saved_dataset(target):
        return datasets.load_from_disk(str(target))

    images, labels, names = generate_synthetic(domain, split, num_images, image_size, seed, variant)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image(), "name": datasets.Value("string")}
    )
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png_bytes(image, IMAGE_PNG_LEVEL), "path": None} for image in images],
            "label": [{"bytes": _png_bytes(label, LABEL_PNG_LEVEL), "path": None} for label in labels],
            "name": names,
        },
        features=features,
    )
    # Written to a private folder, then renamed: concurrent callers never see a half-written split. When
    # another process finished first, its copy (same parameters, byte-identical) is kept.
    with atomic_directory(target, keep_existing=_is_saved_dataset) as scratch:
        dataset.save_to_disk(str(scratch))
    return datasets.load_from_disk(str(target))


# --------------------------------------------------------------------------------------------------------
# A different class set: the 7 coarse Cityscapes categories, written as your own folders would be
# --------------------------------------------------------------------------------------------------------

#: The 7 coarse categories of the Cityscapes label table (``void`` aside), in train-id order, with colours.
COARSE_CATEGORIES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("flat", (128, 64, 128)),
    ("construction", (70, 70, 70)),
    ("object", (220, 220, 0)),
    ("nature", (107, 142, 35)),
    ("sky", (70, 130, 180)),
    ("human", (220, 20, 60)),
    ("vehicle", (0, 0, 142)),
)
CLASS_SETS = ("cityscapes", "coarse")


def coarse_class_table():
    """The class table of the coarse class set: each of the 7 Cityscapes categories takes the Cityscapes label
    ids of its classes (many-to-one: ``flat`` <- road 7, sidewalk 8, parking 9, rail track 10, ...); the ids of
    category ``void`` are void values. Masks of :func:`write_synthetic_folders` hold Cityscapes label ids."""
    from cityscapesscripts.helpers.labels import labels as cityscapes_labels

    from .class_table import ClassTable

    values = {name: [] for name, _ in COARSE_CATEGORIES}
    void = []
    for label in cityscapes_labels:
        if label.id < 0:
            continue
        (values[label.category] if label.category in values else void).append(label.id)
    return ClassTable(
        names=tuple(name for name, _ in COARSE_CATEGORIES),
        values=tuple(tuple(values[name]) for name, _ in COARSE_CATEGORIES),
        void_values=tuple(void),
        colors=tuple(color for _, color in COARSE_CATEGORIES),
        source="<synthetic coarse class set>",
        name="coarse-7",
    )


def write_synthetic_folders(
    out_dir: str | os.PathLike,
    num_train_images: int = 400,
    num_val_images: int = 100,
    image_size: tuple[int, int] = (128, 256),
    seed: int = 0,
    variant: str = "default",
    class_set: str = "coarse",
) -> Path:
    """Write the synthetic shift as two folders of your own: the generic path end to end, without a download.

    Layout: ``out_dir/{source,target}/{train,val}/{images,masks}/NAME.png`` (RGB images; 8-bit masks of
    Cityscapes label ids, which both class sets decode) and the class table ``out_dir/classes.yaml``:
    ``class_set="coarse"`` (default) the 7 Cityscapes categories (:func:`coarse_class_table`), ``"cityscapes"``
    the 19 classes. The scenes are those of :func:`generate_synthetic` (same seeds, same pixels). Train with::

        --source folder --source_dir OUT/source --target folder --target_dir OUT/target \\
            --class_table OUT/classes.yaml

    Returns ``out_dir``.
    """
    from .class_table import protocol_table
    from .protocols import train_id_to_label_id

    if class_set not in CLASS_SETS:
        raise ValueError(f"write_synthetic_folders: class_set={class_set!r}; expected one of {CLASS_SETS}")
    out_dir = Path(out_dir)
    to_label_ids = train_id_to_label_id(19)
    for domain in DOMAINS:
        for split, count in (("train", num_train_images), ("val", num_val_images)):
            images, labels, names = generate_synthetic(
                domain, "train" if split == "train" else "validation", count, image_size, seed, variant
            )
            for sub in ("images", "masks"):
                (out_dir / domain / split / sub).mkdir(parents=True, exist_ok=True)
            for image, label, name in zip(images, labels, names, strict=True):
                Image.fromarray(image).save(
                    out_dir / domain / split / "images" / f"{name}.png", compress_level=1
                )
                Image.fromarray(to_label_ids[label]).save(out_dir / domain / split / "masks" / f"{name}.png")
    table = coarse_class_table() if class_set == "coarse" else protocol_table(19)
    table.save(out_dir / "classes.yaml")
    return out_dir
