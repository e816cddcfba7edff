"""Synthetic hand images in the 11k Hands layout, for tests and dry runs.

``synthesize`` writes ``<out>/Hands/Hand_0000001.jpg ...`` and ``<out>/HandInfo.csv``
with the real 11k columns, so it goes through exactly the 11k preparation code.

Design, so that retrieval is learnable but not trivial:

* Each identity has its own hand geometry (palm size, finger lengths, widths and
  spread, thumb angle), a ring at its own finger and position, and for each of its
  four aspects a few moles at fixed positions; palms also get identity-specific
  creases. Skin colour comes from only four shared tones (the 11k ``skinColor``
  values) with a small jitter, so colour alone does not tell identities apart.
* Each image has its own pose (rotation, translation), scale, background
  gradient, lighting (brightness, contrast, white balance) and pixel noise.
* Left hands are mirrored right hands and the palmar view is mirrored again, so
  the thumb side differs between aspects; dorsal views show nails (polished
  when ``nailPolish`` is 1) and knuckle lines, palmar views a lighter palm with creases.
* Ids are 7-digit strings spread over 0..2100 like the real ones, so the upstream
  id thresholds (about 1050) split them roughly in half.
* About 10% of rows have ``accessories=1`` (drawn with a bracelet); the first two
  images of every identity and aspect never do, so each identity keeps at least
  two usable images per aspect.
* Everything is drawn from ``numpy.random.default_rng`` streams derived from
  ``seed``: the same seed gives byte-identical files.
* ``namespace`` separates corpora: evaluation datasets use namespace 0; namespace
  ``n > 0`` (the pretraining corpus, :mod:`tune_clipfh.model.pretrain`) draws from
  its own streams and numbers its ids from ``n * NAMESPACE_SPAN`` (8+ digits), so
  its identities share neither ids nor appearance with any evaluation dataset.
* `render` draws the images in memory with what was drawn in each
  (`HandAttributes`: tone, nails, ring finger and colour, moles, bracelet, rotation);
  `synthesize` writes them as JPEGs.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from ..names import ASPECTS_OF_HAND
from .errors import DataError

COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand",
           "imageName", "irregularities")
SKIN_TONES = {
    "very fair": (238, 205, 185),
    "fair": (225, 180, 150),
    "medium": (190, 140, 105),
    "dark": (125, 85, 62),
}
RING_COLOURS = ((212, 175, 55), (192, 192, 200), (180, 40, 40), (40, 90, 170), (30, 30, 30),
                (40, 140, 80))
RING_COLOUR_NAMES = ("gold", "silver", "red", "blue", "black", "green")  # RING_COLOURS order
FINGER_NAMES = ("thumb", "index", "middle", "ring", "little")  # _Identity.fingers order
GENERATOR_VERSION = 1
"""Bump whenever the same arguments would draw different images or rows (caches key on it)."""
NAMESPACE_SPAN = 10**7
"""Ids of namespace n start at n * NAMESPACE_SPAN; namespace 0 (evaluation) stays below it."""
ID_RANGE = 2100
ACCESSORY_RATE = 0.1
JPEG_QUALITY = 90
NOISE_STREAM = 2**32 - 1  # seed stream of the shared noise field, apart from identity streams
NOISE_SIGMAS = (2, 3, 4, 5, 6)  # grey levels
PALM_BOTTOM = 0.05  # local y where the palm starts above the wrist


@dataclass
class _Finger:
    base: np.ndarray  # local (x, y) of the finger root
    angle: float  # radians from the +y (finger) axis
    length: float
    width: float


@dataclass
class _Identity:
    id: str
    age: int
    gender: str
    tone: str
    skin: np.ndarray
    nail_polish: int
    palm: tuple[float, float, float]  # width, height, bottom y
    fingers: list[_Finger]  # thumb first
    ring: tuple[int, float, tuple[int, int, int]]  # finger, position along it, colour
    moles: dict[str, np.ndarray]  # per aspect: rows of (u, v, radius) in palm units
    creases: np.ndarray  # three palm lines, each 3 control points (u, v)
    size: float


def synthesize(
    out_dir,
    identities: int = 60,
    images_per_identity: int = 10,
    seed: int = 0,
    image_size: tuple[int, int] = (160, 120),
    progress: bool = True,
    namespace: int = 0,
) -> Path:
    """Write a synthetic 11k-like dataset to ``out_dir``; return ``out_dir``."""
    _check_arguments(identities, images_per_identity, image_size, namespace)
    out = Path(out_dir)
    hands = out / "Hands"
    hands.mkdir(parents=True, exist_ok=True)
    rows = []
    for drawn in render(identities, images_per_identity, seed, image_size, namespace=namespace):
        name = f"Hand_{len(rows) + 1:07d}.jpg"
        drawn.image.save(hands / name, quality=JPEG_QUALITY)
        rows.append(_csv_row(drawn.attributes, name))
    with (out / "HandInfo.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    if progress:
        print(
            f"synthesized {len(rows)} images of {identities} identities into {out}", file=sys.stderr
        )
    return out


@dataclass
class HandAttributes:
    """What was drawn in one image: its 11k columns plus what a caption can name."""

    id: str
    age: int
    gender: str
    tone: str  # a SKIN_TONES key
    accessories: int  # 1: a bracelet is drawn
    nail_polish: int
    aspect: str  # an ASPECTS_OF_HAND value
    ring_finger: str  # a FINGER_NAMES value
    ring_colour: str  # a RING_COLOUR_NAMES value
    moles: int  # moles drawn on this aspect
    rotation: float  # degrees, positive: clockwise on screen


@dataclass
class HandImage:
    image: Image.Image  # RGB, image_size, not JPEG-compressed
    attributes: HandAttributes


def render(
    identities: int,
    images_per_identity: int,
    seed: int = 0,
    image_size: tuple[int, int] = (160, 120),
    aspects: Iterable[str] = ASPECTS_OF_HAND,
    namespace: int = 0,
    rows: Collection[int] | None = None,
) -> Iterator[HandImage]:
    """Draw the images in memory, identity by identity, then aspect, then image (the file
    order of `synthesize`). ``aspects`` picks some aspects and ``rows`` some positions of that
    sequence (the others are skipped, not drawn); each image is drawn from its own streams, so
    it is the same as in the whole."""
    _check_arguments(identities, images_per_identity, image_size, namespace)
    lighting = _Lighting(_stream_key(namespace, seed), *image_size)
    wanted = [a for a in ASPECTS_OF_HAND if a in set(aspects)]
    per_identity = len(wanted) * images_per_identity
    for index in range(identities):
        first = index * per_identity
        if rows is not None and not any(r in rows for r in range(first, first + per_identity)):
            continue
        person = _make_identity(seed, index, identities, namespace)
        for aspect_index, aspect in enumerate(ASPECTS_OF_HAND):
            if aspect not in wanted:
                continue
            shapes = _hand_shapes(person, aspect)
            # Left hands mirror right ones; seen from the palm they mirror again.
            mirror = ("left" in aspect) != ("palmar" in aspect)
            for image_index in range(images_per_identity):
                row = first + wanted.index(aspect) * images_per_identity + image_index
                if rows is not None and row not in rows:
                    continue
                rng = np.random.default_rng(
                    _stream_key(namespace, seed, index, aspect_index, image_index))
                accessories = int(
                    image_index >= 2 and rng.random() < _accessory_chance(images_per_identity)
                )
                extra = [_bracelet(person, rng)] if accessories else []
                image, view = _draw_image(shapes + extra, rng, lighting, mirror, person.size)
                finger, _, colour = person.ring
                yield HandImage(image, HandAttributes(
                    id=person.id, age=person.age, gender=person.gender, tone=person.tone,
                    accessories=accessories, nail_polish=person.nail_polish, aspect=aspect,
                    ring_finger=FINGER_NAMES[finger],
                    ring_colour=RING_COLOUR_NAMES[RING_COLOURS.index(colour)],
                    moles=len(person.moles[aspect]), rotation=math.degrees(view.angle)))


def _check_arguments(identities: int, images_per_identity: int, image_size: tuple[int, int],
                     namespace: int) -> None:
    if identities < 1 or images_per_identity < 1 or min(image_size) < 8:
        raise DataError(
            "synthesize needs identities >= 1, images_per_identity >= 1 and an image_size of"
            f" at least 8x8; got {identities}, {images_per_identity}, {image_size}"
        )
    if namespace < 0 or identities > NAMESPACE_SPAN:
        raise DataError(f"synthesize needs a namespace >= 0 and at most {NAMESPACE_SPAN} "
                        f"identities; got namespace {namespace}, {identities} identities")


def _stream_key(namespace: int, *key: int) -> list[int]:
    """Seed of one numpy stream: namespace 0 keeps the historic keys (same files as before)."""
    return list(key) if namespace == 0 else [namespace, *key]


def _csv_row(drawn: HandAttributes, image_name: str) -> tuple:
    irregularities = 0
    return (drawn.id, drawn.age, drawn.gender, drawn.tone, drawn.accessories,
            drawn.nail_polish, drawn.aspect, image_name, irregularities)  # COLUMNS order


def _accessory_chance(images_per_identity: int) -> float:
    # Only images after the first two can have accessories; scale up to keep ~10% overall.
    eligible = images_per_identity - 2
    return min(1.0, ACCESSORY_RATE * images_per_identity / eligible) if eligible > 0 else 0.0


def _make_identity(seed: int, index: int, count: int, namespace: int = 0) -> _Identity:
    rng = np.random.default_rng(_stream_key(namespace, seed, index))
    tone = str(rng.choice(list(SKIN_TONES)))
    palm_w, palm_h = rng.uniform(0.34, 0.44), rng.uniform(0.36, 0.46)
    return _Identity(
        id=f"{namespace * NAMESPACE_SPAN + index * max(1, ID_RANGE // count):07d}",
        age=int(rng.integers(18, 76)),
        gender=str(rng.choice(["male", "female"])),
        tone=tone,
        skin=np.array(SKIN_TONES[tone]) + rng.uniform(-8, 8, 3),
        nail_polish=int(rng.random() < 0.15),
        palm=(palm_w, palm_h, PALM_BOTTOM),
        fingers=_make_fingers(rng, palm_w, palm_h, PALM_BOTTOM),
        ring=(
            int(rng.integers(1, 5)),
            rng.uniform(0.2, 0.4),
            RING_COLOURS[rng.integers(len(RING_COLOURS))],
        ),
        moles={
            aspect: np.column_stack([rng.uniform(0.15, 0.85, (n, 2)), rng.uniform(0.015, 0.03, n)])
            for aspect, n in zip(ASPECTS_OF_HAND, rng.integers(2, 5, 4), strict=True)
        },
        creases=rng.uniform(0.1, 0.9, (3, 3, 2)),
        size=rng.uniform(0.9, 1.1),
    )


def _make_fingers(
    rng: np.random.Generator, palm_w: float, palm_h: float, bottom: float
) -> list[_Finger]:
    top = bottom + palm_h * 0.95
    spread = math.radians(rng.uniform(3, 10))
    lengths = np.array([0.85, 0.97, 0.9, 0.7]) * rng.uniform(0.9, 1.1, 4) * palm_h
    widths = palm_w / 4 * rng.uniform(0.72, 0.9, 4)
    fingers = [
        _Finger(
            np.array([-palm_w / 2 + (i + 0.5) * palm_w / 4, top]),
            (i - 1.5) * spread,
            lengths[i],
            widths[i],
        )
        for i in range(4)
    ]
    thumb = _Finger(
        np.array([-palm_w / 2 + 0.02, bottom + palm_h * rng.uniform(0.25, 0.4)]),
        -math.radians(rng.uniform(35, 60)),
        palm_h * rng.uniform(0.55, 0.7),
        palm_w / 4 * 1.05,
    )
    return [thumb, *fingers]


@dataclass
class _Shape:
    """Something to draw, in local hand coordinates (see `_View`)."""

    kind: str  # "polygon", "line" or "disc"
    points: np.ndarray  # [n, 2]; a disc has one point, its centre
    colour: tuple[int, int, int]
    size: float = 0.0  # line width or disc radius, local units
    outline: tuple[int, int, int] | None = None


def _draw_image(
    shapes: list[_Shape],
    rng: np.random.Generator,
    lighting: _Lighting,
    mirror: bool,
    hand_size: float,
) -> tuple[Image.Image, _View]:
    width, height = lighting.width, lighting.height
    image = _background(rng, width, height)
    view = _View(
        mirror=mirror,
        angle=math.radians(rng.uniform(-15, 15)),
        scale=0.85 * width * hand_size * rng.uniform(0.88, 1.1),
        centre=np.array([width, height]) * (0.5 + rng.uniform(-0.06, 0.06, 2)),
    )
    _draw_shapes(ImageDraw.Draw(image), view, shapes)
    return lighting(image, rng), view


def _draw_shapes(draw: ImageDraw.ImageDraw, view: _View, shapes: list[_Shape]) -> None:
    # One transform for all points of the image: drawing is the hot loop.
    ends = np.cumsum([len(s.points) for s in shapes])
    pixels = np.split(view(np.concatenate([s.points for s in shapes])), ends[:-1])
    for shape, points in zip(shapes, pixels, strict=True):
        if shape.kind == "polygon":
            draw.polygon(points.ravel().tolist(), fill=shape.colour, outline=shape.outline)
        elif shape.kind == "line":
            draw.line(
                points.ravel().tolist(), fill=shape.colour, width=int(view.length(shape.size))
            )
        else:
            (x, y), radius = points[0], view.length(shape.size)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=shape.colour)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Bilinear upsampling of four random corner colours: a smooth, per-image gradient.
    corners = rng.uniform(120, 255, (2, 2, 3)).astype(np.uint8)
    return Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)


class _Lighting:
    """Per-image brightness, contrast, white balance and pixel noise, all in PIL's C
    code (numpy float maths per image would dominate the run time).

    Noise comes from random windows of a few pre-drawn Gaussian fields, one per
    noise level, stored as ``128 + sigma * z``.
    """

    def __init__(self, key: list[int], width: int, height: int):
        rng = np.random.default_rng([*key, NOISE_STREAM])
        normal = rng.standard_normal((2 * height, 2 * width, 3))
        self.fields = [
            Image.fromarray(np.clip(normal * sigma + 128, 0, 255).round().astype(np.uint8))
            for sigma in NOISE_SIGMAS
        ]
        self.width, self.height = width, height

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.15)
        white_balance = rng.uniform(0.93, 1.07, 3)
        # Per channel: ((v - 128) * contrast + 128 * brightness) * white balance.
        gains, offsets = white_balance * contrast, white_balance * 128 * (brightness - contrast)
        matrix = np.column_stack([np.diag(gains), offsets])  # PIL's 3x4 RGB -> RGB matrix
        lit = image.convert("RGB", tuple(matrix.ravel().tolist()))
        field = self.fields[rng.integers(len(self.fields))]
        top, left = int(rng.integers(self.height)), int(rng.integers(self.width))
        noise = field.crop((left, top, left + self.width, top + self.height))
        return ImageChops.add(lit, noise, offset=-128)


@dataclass
class _View:
    """Maps local hand coordinates (x across the hand, y from wrist to fingertips,
    hand length about 1) to pixels."""

    mirror: bool
    angle: float
    scale: float
    centre: np.ndarray

    def __call__(self, local: np.ndarray) -> np.ndarray:
        x = -local[:, 0] if self.mirror else local[:, 0]
        # Fingers point right on the landscape canvas; then the per-image rotation.
        u, v = (local[:, 1] - 0.45) * self.scale, x * self.scale
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return np.column_stack([u * cos - v * sin, u * sin + v * cos]) + self.centre

    def length(self, local: float) -> float:
        return max(1.0, local * self.scale)


def _hand_shapes(person: _Identity, aspect: str) -> list[_Shape]:
    """Everything identity- and aspect-specific, drawn the same in every image."""
    palmar = aspect.startswith("palmar")
    skin = person.skin * 0.65 + np.array([240, 190, 175]) * 0.35 if palmar else person.skin
    fill, edge = _colour(skin), _colour(skin * 0.75)
    palm_w, palm_h, bottom = person.palm
    wrist = _rectangle(0, bottom - 0.12, palm_w * 0.8, 0.2)
    palm = _superellipse(0, bottom + palm_h / 2, palm_w / 2, palm_h / 2)
    shapes = [_Shape("polygon", outline, fill, outline=edge) for outline in (wrist, palm)]
    for finger in person.fingers:
        shapes.append(_Shape("polygon", _finger_outline(finger), fill, outline=edge))
        if palmar:
            shapes += [_Shape("line", _across(finger, t, 0.6), edge, 0.006) for t in (0.35, 0.65)]
        else:
            shapes += [
                _Shape("line", _across(finger, 0.5, 0.5), edge, 0.006),
                _nail(finger, person, skin),
            ]
    finger_index, position, colour = person.ring
    shapes.append(
        _Shape("line", _across(person.fingers[finger_index], position, 1.05), colour, 0.03)
    )
    if palmar:
        shapes += [
            _Shape("line", _palm_points(person, _bezier(line)), _colour(skin * 0.6), 0.008)
            for line in person.creases
        ]
    shapes += [
        _Shape("disc", _palm_points(person, [[u, v]]), (70, 45, 35), radius)
        for u, v, radius in person.moles[aspect]
    ]
    return shapes


def _bracelet(person: _Identity, rng: np.random.Generator) -> _Shape:
    palm_w, _, bottom = person.palm
    band = np.array([[-palm_w * 0.42, bottom - 0.05], [palm_w * 0.42, bottom - 0.05]])
    return _Shape("line", band, _colour(rng.uniform(0, 255, 3)), 0.06)


def _nail(finger: _Finger, person: _Identity, skin: np.ndarray) -> _Shape:
    nail = _Finger(
        _along(finger, 1 - 0.9 * finger.width / finger.length),
        finger.angle,
        0.9 * finger.width,
        finger.width * 0.6,
    )
    colour = (190, 20, 60) if person.nail_polish else _colour(skin * 0.7 + 255 * 0.3)
    return _Shape("polygon", _finger_outline(nail), colour)


def _colour(rgb) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(rgb, 0, 255))


def _direction(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors along a finger and across it."""
    along = np.array([math.sin(angle), math.cos(angle)])
    across = np.array([math.cos(angle), -math.sin(angle)])
    return along, across


def _along(finger: _Finger, t: float) -> np.ndarray:
    return finger.base + _direction(finger.angle)[0] * finger.length * t


def _finger_outline(finger: _Finger) -> np.ndarray:
    along, across = _direction(finger.angle)
    half = finger.width / 2
    tip = finger.base + along * (finger.length - half)
    arc = [
        tip + half * (across * math.cos(a) + along * math.sin(a))
        for a in np.linspace(math.pi, 0, 7)
    ]
    return np.array([finger.base - across * half, *arc, finger.base + across * half])


def _across(finger: _Finger, t: float, fraction: float) -> np.ndarray:
    """A segment across the finger at ``t`` of its length, ``fraction`` of its width."""
    centre, half = _along(finger, t), _direction(finger.angle)[1] * finger.width * fraction / 2
    return np.array([centre - half, centre + half])


def _palm_points(person: _Identity, uv) -> np.ndarray:
    """Palm-relative (u, v) in [0, 1]^2 to local coordinates."""
    palm_w, palm_h, bottom = person.palm
    uv = np.asarray(uv)
    return np.column_stack([(uv[:, 0] - 0.5) * palm_w * 0.9, bottom + uv[:, 1] * palm_h * 0.9])


def _bezier(control: np.ndarray, steps: int = 8) -> np.ndarray:
    t = np.linspace(0, 1, steps)[:, None]
    return (1 - t) ** 2 * control[0] + 2 * (1 - t) * t * control[1] + t**2 * control[2]


def _rectangle(cx: float, y0: float, width: float, height: float) -> np.ndarray:
    left, right = cx - width / 2, cx + width / 2
    return np.array([[left, y0], [right, y0], [right, y0 + height], [left, y0 + height]])


def _superellipse(cx: float, cy: float, a: float, b: float, points: int = 24) -> np.ndarray:
    angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
    cos, sin = np.cos(angles), np.sin(angles)
    # Exponent 4: a rounded rectangle, closer to a palm than an ellipse.
    return np.column_stack(
        [cx + a * np.sign(cos) * np.abs(cos) ** 0.5, cy + b * np.sign(sin) * np.abs(sin) ** 0.5]
    )
