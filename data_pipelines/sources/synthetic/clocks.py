"""Analog clocks drawn from scratch, answered in the PixMo-Clocks style.

PixMo-Clocks publishes only metadata rows of facer.io watch faces (time, format, seconds shown,
visible hands) and no renderer, so this module draws its own faces: light or dark dials, a rim,
hour or minute ticks, arabic / roman / quarter / no numerals, bar or tapered hands in several
colours, an optional seconds hand and AM/PM label, rotation and scale jitter and a varied
background. The picture is drawn at 2-4x resolution and box-filtered down so that hands and
ticks stay readable at 112-168 px.

`clock_answer` reproduces the official PixMo-Clocks answer text and metadata, including its
quirks (12:xx is labelled "AM"; without AM/PM the metadata hour is taken modulo 12);
`render_clock_row` draws the image of a PixMo-Clocks metadata row.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.sources.synthetic.base import ImageSize, SyntheticSource, image_hw, paint_background

QUESTION = "What time is being shown?"
WITH_AM_PM = "12 hour clock (with AM/PM)"
WITHOUT_AM_PM = "12 hour clock (without AM/PM)"
NOT_SHOWN = "The time is not shown"
ROMAN = ("XII", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI")

_LIGHT_DIALS = ((255, 255, 255), (250, 244, 228), (236, 240, 245), (245, 235, 210), (225, 238, 225))
_DARK_DIALS = ((20, 24, 40), (30, 30, 30), (18, 48, 38), (60, 20, 28))
_DARK_INK = ((15, 15, 15), (30, 30, 70), (60, 35, 20))
_LIGHT_INK = ((245, 245, 245), (240, 220, 160))
_SECOND_HAND = ((215, 30, 30), (240, 140, 0), (30, 120, 220))
_RIMS = ((40, 40, 40), (150, 150, 155), (185, 150, 60), (120, 70, 40), (30, 60, 120))


def clock_answer(hour: int, minute: int, second: int, shows_seconds: bool,
                 time_format: str) -> Tuple[str, Dict[str, int]]:
    """Answer text and eval metadata of one clock, exactly as the official PixMo-Clocks loader.

    Args:
      hour: 0..23; minute, second: 0..59.
      time_format: WITH_AM_PM, WITHOUT_AM_PM or NOT_SHOWN.
    Returns:
      ("The time shown is 7:57:39 AM", {"hour", "minute", "second"}) with second = -1 when the
      seconds are not shown and all -1 when the time is not shown.
    """
    if time_format == NOT_SHOWN:
        return "The time is not shown in the image.", dict(hour=-1, minute=-1, second=-1)
    if time_format not in (WITH_AM_PM, WITHOUT_AM_PM):
        raise ValueError(f"unknown clock time_format {time_format!r}; expected one of "
                         f"{(WITH_AM_PM, WITHOUT_AM_PM, NOT_SHOWN)}")
    if not (0 <= hour < 24 and 0 <= minute < 60 and 0 <= second < 60):
        raise ValueError(f"clock time out of range: {hour}:{minute}:{second}")
    am_pm = am_pm_label(hour)
    hour_str = "12" if hour == 0 else str(hour - 12 if hour > 12 else hour)
    time = f"{hour_str}:{minute:02d}"
    if shows_seconds:
        time += f":{second:02d}"
    if time_format == WITH_AM_PM:
        time += f" {am_pm}"
    elif hour >= 12:
        hour -= 12
    return "The time shown is " + time, dict(hour=hour, minute=minute, second=second if shows_seconds else -1)


def am_pm_label(hour: int) -> str:
    """The official loader labels only hours 13..23 as PM (12:xx is "AM")."""
    return "PM" if hour > 12 else "AM"


@dataclasses.dataclass(frozen=True)
class ClockFace:
    """The look of one watch face (everything except the time and the placement)."""
    dial: Tuple[int, int, int]
    ink: Tuple[int, int, int]           # ticks, numerals, hour and minute hands
    rim: Tuple[int, int, int]
    rim_frac: float                     # rim width as a fraction of the radius
    numerals: str                       # "arabic" | "roman" | "quarters" | "none"
    ticks: str                          # "hours" | "minutes" | "none"
    hand_shape: str                     # "bar" | "taper"
    second_color: Tuple[int, int, int]


def sample_face(rng: np.random.Generator) -> ClockFace:
    """A random face; faces without numerals always get ticks so the dial stays readable."""
    dark = rng.random() < 0.25
    dials, inks = (_DARK_DIALS, _LIGHT_INK) if dark else (_LIGHT_DIALS, _DARK_INK)
    numerals = str(rng.choice(["arabic", "roman", "quarters", "none"], p=[0.4, 0.2, 0.2, 0.2]))
    ticks = str(rng.choice(["hours", "minutes", "none"], p=[0.4, 0.4, 0.2]))
    if numerals in ("none", "quarters") and ticks == "none":
        ticks = "hours"
    return ClockFace(
        dial=tuple(int(v) for v in dials[rng.integers(len(dials))]),
        ink=tuple(int(v) for v in inks[rng.integers(len(inks))]),
        rim=tuple(int(v) for v in _RIMS[rng.integers(len(_RIMS))]),
        rim_frac=float(rng.uniform(0.03, 0.12)),
        numerals=numerals,
        ticks=ticks,
        hand_shape=str(rng.choice(["bar", "taper"])),
        second_color=tuple(int(v) for v in _SECOND_HAND[rng.integers(len(_SECOND_HAND))]),
    )


# One fixed, high-contrast face (white dial, black bar hands, hour ticks, no numerals): the
# `plain_faces` option of ClockSource, for models small enough that the face variety would
# drown the hands.
PLAIN_FACE = ClockFace(dial=(255, 255, 255), ink=(15, 15, 15), rim=(40, 40, 40), rim_frac=0.06,
                       numerals="none", ticks="hours", hand_shape="bar", second_color=(215, 30, 30))


def _polar(cx: float, cy: float, radius: float, angle_deg: float) -> Tuple[float, float]:
    """Point at `radius` from the centre, `angle_deg` clockwise from 12 o'clock."""
    a = np.deg2rad(angle_deg)
    return cx + radius * np.sin(a), cy - radius * np.cos(a)


def _hand(draw: ImageDraw.ImageDraw, cx: float, cy: float, angle: float, length: float, tail: float,
          width: float, color, shape: str) -> None:
    tip_w = width * (0.3 if shape == "taper" else 1.0)
    back = _polar(cx, cy, -tail, angle)
    tip = _polar(cx, cy, length, angle)
    side = np.deg2rad(angle + 90)
    ox, oy = np.sin(side), -np.cos(side)
    pts = [(back[0] + ox * width / 2, back[1] + oy * width / 2),
           (tip[0] + ox * tip_w / 2, tip[1] + oy * tip_w / 2),
           (tip[0] - ox * tip_w / 2, tip[1] - oy * tip_w / 2),
           (back[0] - ox * width / 2, back[1] - oy * width / 2)]
    draw.polygon(pts, fill=color)


def draw_clock(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, face: ClockFace,
               hands: Mapping[str, Optional[float]], rotation: float = 0.0,
               am_pm: Optional[str] = None, min_width: float = 1.0) -> None:
    """Draws one clock onto `draw`.

    Args:
      cx, cy, radius: centre and outer radius in the canvas' pixels.
      hands: angles in degrees clockwise from 12 for "hour", "minute", "second" (None = hidden).
      rotation: degrees added to the whole dial (numeral glyphs stay upright).
      min_width: narrowest stroke, in canvas pixels (one output pixel when supersampling).
    """
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=face.rim)
    r = radius * (1 - face.rim_frac)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=face.dial)
    if face.ticks != "none":
        for i in range(0, 60, 1 if face.ticks == "minutes" else 5):
            major = i % 5 == 0
            inner = r * (0.80 if major else 0.88)
            width = max(r * (0.045 if major else 0.015), min_width)
            a = i * 6 + rotation
            draw.line([_polar(cx, cy, inner, a), _polar(cx, cy, r * 0.95, a)], fill=face.ink,
                      width=int(round(width)))
    if face.numerals != "none":
        size = r * (0.26 if face.numerals in ("arabic", "quarters") else 0.18)
        font = ImageFont.load_default(size=max(size, 4 * min_width))
        ring = r * (0.62 if face.ticks != "none" else 0.74)
        for n in range(12):
            if face.numerals == "quarters" and n % 3:
                continue
            label = ROMAN[n] if face.numerals == "roman" else str(12 if n == 0 else n)
            draw.text(_polar(cx, cy, ring, n * 30 + rotation), label, fill=face.ink, font=font, anchor="mm")
    if am_pm is not None:
        font = ImageFont.load_default(size=max(r * 0.2, 4 * min_width))
        draw.text(_polar(cx, cy, r * 0.35, 180 + rotation), am_pm, fill=face.ink, font=font, anchor="mm")
    specs = {"hour": (0.50, 0.10, 0.085, face.ink, face.hand_shape),
             "minute": (0.80, 0.10, 0.055, face.ink, face.hand_shape),
             "second": (0.88, 0.18, 0.018, face.second_color, "bar")}
    for name, (length, tail, width, color, shape) in specs.items():
        if hands.get(name) is not None:
            _hand(draw, cx, cy, hands[name] + rotation, r * length, r * tail,
                  max(r * width, min_width), color, shape)
    dot = max(r * 0.05, min_width)
    hub = face.second_color if hands.get("second") is not None else face.ink
    draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=hub)


def hand_angles(hour: int, minute: int, second: int, visible: Tuple[bool, bool, bool]) -> Dict[str, Optional[float]]:
    """Hand angles (degrees clockwise from 12) of a time; hidden hands are None."""
    angles = {"hour": (hour % 12 + minute / 60 + second / 3600) * 30,
              "minute": (minute + second / 60) * 6,
              "second": second * 6.0}
    return {k: (v if show else None) for (k, v), show in zip(angles.items(), visible)}


def render_clock(rng: np.random.Generator, image_size: ImageSize, face: ClockFace,
                 hands: Mapping[str, Optional[float]], am_pm: Optional[str] = None,
                 max_rotation: float = 15.0, centred: bool = False) -> np.ndarray:
    """A clock with random size, position and rotation on a random background.  uint8[H, W, 3].
    centred: the dial fills the image's centre instead (same random draws otherwise)."""
    h, w = image_hw(image_size)
    k = 4 if min(h, w) <= 256 else 2            # supersampling factor
    background = Image.fromarray(paint_background(rng, h, w)).resize((w * k, h * k), Image.BILINEAR)
    draw = ImageDraw.Draw(background)
    radius = 0.5 * min(h, w) * rng.uniform(0.6, 0.95)
    cx = rng.uniform(radius, w - radius)
    cy = rng.uniform(radius, h - radius)
    if centred:
        radius, cx, cy = 0.475 * min(h, w), w / 2, h / 2
    draw_clock(draw, cx * k, cy * k, radius * k, face, hands, rotation=rng.uniform(-max_rotation, max_rotation),
               am_pm=am_pm, min_width=float(k))
    return np.asarray(background.reduce(k))


class ClockSource(SyntheticSource):
    """Random analog clocks asking "What time is being shown?".

    Example: {"image": uint8[H, W, 3], "style": "clocks", "question", "answer",
              "metadata": {"hour", "minute", "second" (PixMo-Clocks eval convention), "time_format",
                           "shows_seconds", "example_id"}}.

    Args:
      seconds_rate: fraction of clocks with a seconds hand (and seconds in the answer).
      am_pm_rate: fraction of faces printing AM/PM (and answering with it).
      max_rotation: rotation jitter of the dial, degrees.
      plain_faces: draw every clock with PLAIN_FACE instead of a random face.
      centred: every dial in the middle of the image, at nearly its full size.
    """

    name = "clocks"

    def __init__(self, num_examples: int, image_size: ImageSize = 168, seed: int = 0,
                 seconds_rate: float = 0.3, am_pm_rate: float = 0.2, max_rotation: float = 15.0,
                 plain_faces: bool = False, centred: bool = False):
        super().__init__(num_examples, image_size, seed)
        self.seconds_rate = float(seconds_rate)
        self.am_pm_rate = float(am_pm_rate)
        self.max_rotation = float(max_rotation)
        self.plain_faces = bool(plain_faces)
        self.centred = bool(centred)

    def _repr_fields(self):
        return dict(seconds_rate=self.seconds_rate, am_pm_rate=self.am_pm_rate, max_rotation=self.max_rotation,
                    plain_faces=self.plain_faces, centred=self.centred)

    def generate(self, rng: np.random.Generator) -> Dict[str, Any]:
        t = int(rng.integers(0, 24 * 3600))
        hour, minute, second = t // 3600, t // 60 % 60, t % 60
        shows_seconds = bool(rng.random() < self.seconds_rate)
        time_format = WITH_AM_PM if rng.random() < self.am_pm_rate else WITHOUT_AM_PM
        face = sample_face(rng)
        if self.plain_faces:  # drawn anyway, so both options see the same times and placements
            face = PLAIN_FACE
        image = render_clock(rng, self.image_size, face, hand_angles(hour, minute, second, (True, True, shows_seconds)),
                             am_pm=am_pm_label(hour) if time_format == WITH_AM_PM else None,
                             max_rotation=self.max_rotation, centred=self.centred)
        answer, times = clock_answer(hour, minute, second, shows_seconds, time_format)
        return dict(image=image, style="clocks", question=QUESTION, answer=answer,
                    metadata=dict(times, time_format=time_format, shows_seconds=shows_seconds))


def _row_time(row: Mapping[str, Any]) -> Tuple[int, int, int]:
    """(hour 0..23, minute, second) of a row: its `watch_time` (keeps AM/PM), else hour/minute/second."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}))?\s*([AaPp][Mm])?\s*", str(row.get("watch_time", "")))
    if match:
        hour, minute, second = int(match[1]), int(match[2]), int(match[3] or 0)
        if match[4] and match[4].upper() == "PM" and hour < 12:
            hour += 12
        return hour, minute, second
    if all(k in row for k in ("hour", "minute", "second")):
        return int(row["hour"]), int(row["minute"]), max(int(row["second"]), 0)
    raise ValueError(f"PixMo-Clocks row {row.get('example_id')!r}: needs a watch_time like '19:57:39' or "
                     f"hour/minute/second, got watch_time={row.get('watch_time')!r}")


def _row_format(time_format: str) -> str:
    """Maps both the HF names ("With AM/PM", ...) and the loader's names onto ours."""
    lower = time_format.lower()
    if "not shown" in lower:
        return NOT_SHOWN
    if "without" in lower:
        return WITHOUT_AM_PM
    if "with" in lower:
        return WITH_AM_PM
    raise ValueError(f"unknown PixMo-Clocks time_format {time_format!r}")


def render_clock_row(row: Mapping[str, Any], image_size: ImageSize = 336, seed: int = 0) -> Dict[str, Any]:
    """Draws the clock of one PixMo-Clocks metadata row and returns it as a clocks example.

    The row needs hour/minute/second (or `watch_time`), `time_format` and `shows_seconds`;
    `hour_visible` / `minute_visible` / `second_visible` = -1 hide that hand. The face design is
    seeded by `watchface_id`, so rows of one face share a look.
    """
    hour, minute, second = _row_time(row)
    time_format = _row_format(str(row.get("time_format", WITHOUT_AM_PM)))
    shows_seconds = bool(row.get("shows_seconds", False))
    face_seed = zlib.crc32(str(row.get("watchface_id", row.get("example_id", ""))).encode())
    face = sample_face(np.random.default_rng([face_seed, seed]))
    rng = np.random.default_rng([zlib.crc32(str(row.get("example_id", "")).encode()), seed])
    visible = tuple(int(row.get(f"{k}_visible", 0)) != -1 for k in ("hour", "minute", "second"))
    visible = (visible[0], visible[1], visible[2] and shows_seconds)
    if time_format == NOT_SHOWN:
        visible = (False, False, False)
    image = render_clock(rng, image_size, face, hand_angles(hour, minute, second, visible),
                         am_pm=am_pm_label(hour) if time_format == WITH_AM_PM else None)
    answer, times = clock_answer(hour, minute, second, shows_seconds, time_format)
    return dict(image=image, style="clocks", question=QUESTION, answer=answer,
                metadata=dict(times, time_format=time_format, shows_seconds=shows_seconds,
                              example_id=row.get("example_id")))
