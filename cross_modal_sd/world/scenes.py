"""Mini-world scenes: a road seen from the side with one or two objects, rendered at any time.

A scene is a handful of attributes; rendering is a pure function of (scene, time), so the 8 RGB
frames of the target and the high-rate renders the event simulator needs come from one source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("car", "truck", "bike")
# (width, height) in pixels at the 32x32 reference size; lanes are 8 px tall.
CLASS_SIZE = {"car": (7, 4), "truck": (11, 6), "bike": (4, 3)}
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (0.95, 0.50, 0.05),
}
LANES = ("far", "middle", "near")
DIRECTIONS = ("left", "right", "stopped")
SPEEDS = {"slow": 6.0, "fast": 14.0}  # pixels travelled over one clip

HEADLIGHT = np.array([1.0, 1.0, 0.75], dtype=np.float32)
SKY_ROWS = 8  # rows 0..7 are sky; the three lanes fill the rest of a 32-row frame
LANE_ROWS = 8


@dataclass(frozen=True)
class RoadObject:
    """One object on the road; `direction == "stopped"` means parked (invisible to events)."""

    cls: str
    colour: str
    lane: int
    direction: str
    speed: str
    x0: float  # left edge at t = 0, in pixels

    def x_at(self, t: float) -> float:
        """Left edge at clip time t in [0, 1]."""
        if self.direction == "stopped":
            return self.x0
        sign = 1.0 if self.direction == "right" else -1.0
        return self.x0 + sign * SPEEDS[self.speed] * t

    @property
    def moving(self) -> bool:
        return self.direction != "stopped"


@dataclass(frozen=True)
class Scene:
    """A clip's worth of world: lighting plus 1-2 objects in distinct lanes with distinct classes."""

    scene_id: str
    night: bool
    objects: tuple[RoadObject, ...]


def sample_scene(scene_id: str, rng: np.random.Generator, size: int = 32) -> Scene:
    """Draws a scene: 1-2 objects of distinct classes in distinct lanes; about 1 in 4 is parked."""
    n = 1 if rng.random() < 0.65 else 2
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    lanes = rng.choice(len(LANES), size=n, replace=False)
    objects = []
    for c, lane in zip(classes, lanes, strict=True):
        cls = CLASSES[int(c)]
        direction = DIRECTIONS[int(rng.choice(3, p=[0.375, 0.375, 0.25]))]
        speed = str(rng.choice(list(SPEEDS)))
        width = CLASS_SIZE[cls][0] * size / 32
        travel = SPEEDS[speed] * size / 32 if direction != "stopped" else 0.0
        # Keep the object fully in frame for the whole clip.
        lo, hi = 1.0, size - 1.0 - width - travel
        x = float(rng.uniform(lo, hi))
        x0 = x + travel if direction == "left" else x
        objects.append(
            RoadObject(
                cls=cls,
                colour=str(rng.choice(list(COLOURS))),
                lane=int(lane),
                direction=direction,
                speed=speed,
                x0=x0 * 32 / size,
            )
        )
    return Scene(scene_id=scene_id, night=bool(rng.random() < 0.3), objects=tuple(objects))


def render(scene: Scene, t: float, size: int = 32) -> np.ndarray:
    """Renders the scene at clip time t in [0, 1] as float32 RGB (3, size, size) in [0, 1].

    Object edges are anti-aliased by horizontal coverage, so sub-pixel motion changes intensity
    smoothly and the event simulator sees motion between integer pixel steps.
    """
    scale = size / 32
    img = np.empty((3, size, size), dtype=np.float32)
    sky = np.array([0.05, 0.05, 0.15] if scene.night else [0.55, 0.75, 0.95], dtype=np.float32)
    road = 0.18 if scene.night else 0.45
    sky_rows = round(SKY_ROWS * scale)
    img[:, :sky_rows] = sky[:, None, None]
    # Lanes are paved a little differently (far darkest), as real lanes often are.
    for lane in range(len(LANES)):
        top = sky_rows + round(lane * LANE_ROWS * scale)
        img[:, top : top + round(LANE_ROWS * scale)] = road * (0.85 + 0.15 * lane)
    # Lane markings between lanes: a dashed light line.
    for k in (1, 2):
        row = sky_rows + round(k * LANE_ROWS * scale) - 1
        img[:, row, ::4] = 0.8 if not scene.night else 0.4
    cols = np.arange(size, dtype=np.float32)
    for obj in scene.objects:
        w, h = (v * scale for v in CLASS_SIZE[obj.cls])
        left = obj.x_at(t) * scale
        # Horizontal coverage of each pixel column by [left, left + w).
        cover = np.clip(np.minimum(cols + 1, left + w) - np.maximum(cols, left), 0.0, 1.0)
        lane_top = sky_rows + obj.lane * LANE_ROWS * scale
        top = round(lane_top + (LANE_ROWS * scale - h) / 2)
        rows = slice(top, top + round(h))
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) * (0.6 if scene.night else 1.0)
        region = img[:, rows, :]
        img[:, rows, :] = region * (1 - cover) + colour[:, None, None] * cover
        if obj.moving:
            # A lit headlight marks the front, so heading is visible in a single frame.
            front = int(
                np.clip(np.floor(left + w - 1 if obj.direction == "right" else left), 0, size - 1)
            )
            img[:, rows, front] = HEADLIGHT[:, None]
    return img


def render_clip(scene: Scene, n_frames: int, size: int = 32) -> np.ndarray:
    """Renders n_frames evenly spaced over the clip: (n_frames, 3, size, size) float32."""
    times = np.linspace(0.0, 1.0, n_frames)
    return np.stack([render(scene, float(t), size) for t in times])
