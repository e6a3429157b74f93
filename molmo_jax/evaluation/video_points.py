"""Reading Molmo2's video point and track answers back into numbers, as its eval code does.

Transcribed from allenai/molmo2 `olmo/preprocessing/point_formatter.py`: the module-level
`extract_multi_image_points` tries `UnifiedPointFormatter` (the released "html-v2" format:
`<points coords="0.5 1 452 318;1.0 1 460 320 2 100 900">label</points>`, a timestamp then
"index x y" triples on a 0..1000 scale, frames separated by tab / ":" / "," / ";") and falls back
to `LegacyPointFormatting` (`<points 0.5 1 45.2 31.8 2 ... />`, 0..100 scale) when it finds no
point; `UnifiedPointFormatter.extract_tracks` groups the triples by timestamp into frames
(frame = round(t * video fps)) keyed by object index, dropping an index repeated in one frame.
Points outside the frame (unified) or above 100 (legacy) are dropped, as upstream does.
Where upstream raises on a malformed timestamp ("1.2.3"), that frame is skipped here.
"""
import re

_COORDS = re.compile(r'<(?:points|tracks).*? coords="([0-9\t:;, .]+)"/?>')
_FRAME = re.compile(r"(?:^|\t|:|,|;)([0-9\.]+) ([0-9\. ]+)")
_POINT = re.compile(r"([0-9]+) ([0-9]{3,4}) ([0-9]{3,4})")
_LEGACY_BLOCK = re.compile(r"<points\s+([^/>]*?)\s*/>")


def _unified(text: str, width: float, height: float) -> list[tuple[float, str, float, float]]:
    out = []
    for coords in _COORDS.finditer(text):
        for frame in _FRAME.finditer(coords.group(1)):
            try:
                t = float(frame.group(1))
            except ValueError:
                continue
            for index, x, y in _POINT.findall(frame.group(2)):
                x, y = float(x) / 1000 * width, float(y) / 1000 * height
                if 0 <= x <= width and 0 <= y <= height:
                    out.append((t, index, x, y))
    return out


def _legacy(text: str, width: float, height: float) -> list[tuple[float, float, float]]:
    """The legacy blocks; any malformed block makes the whole answer pointless (upstream returns None)."""
    out = []
    try:
        for block in _LEGACY_BLOCK.findall(text):
            tokens = block.strip().split()
            if not tokens:
                continue
            t, rest = float(tokens[0]), tokens[1:]
            if len(rest) % 3:
                return []
            for i in range(0, len(rest), 3):
                x, y = float(rest[i + 1]), float(rest[i + 2])
                if max(x, y) > 100:
                    continue
                out.append((t, x / 100 * width, y / 100 * height))
    except ValueError:
        return []
    return out


def video_points(text: str, width: float, height: float) -> list[tuple[float, float, float]]:
    """(timestamp s, x px, y px) of every point of an answer, in the order written."""
    unified = [(t, x, y) for t, _, x, y in _unified(text, width, height)]
    return unified or _legacy(text, width, height)


def video_tracks(text: str, width: float, height: float, video_fps: float) -> list[dict]:
    """[{"time", "frame", "points": {index str: {"point": [x, y]}}}] sorted by time (unified format)."""
    frames: dict[float, dict] = {}
    for t, index, x, y in _unified(text, width, height):
        frames.setdefault(t, {}).setdefault(index, {"point": [x, y]})  # a repeated index: a formatting error
    return [{"time": t, "frame": round(t * video_fps), "points": frames[t]} for t in sorted(frames)]
