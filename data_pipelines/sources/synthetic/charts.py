"""Bar charts with questions about their data, a small stand-in for PixMo-Docs charts.

Each chart has a title, 3-6 labelled bars with their values printed on top and a y axis; the
questions ask for one bar's value, the largest / smallest bar, the number of bars, the
difference of two bars, or the title. Drawn with PIL at 2-4x and box-filtered down (matplotlib
would be ~20x slower per image), so charts stay readable from about 160 px.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.sources.synthetic.base import ImageSize, SyntheticSource, paint_background

CATEGORIES = (
    ("apples", "pears", "plums", "grapes", "kiwis", "limes", "figs", "dates"),
    ("Oslo", "Lima", "Rome", "Cairo", "Quito", "Perth", "Riga", "Baku"),
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug"),
    ("red", "blue", "green", "gold", "gray", "pink", "teal", "navy"),
)
TITLES = ("Sales", "Visitors", "Votes", "Rainfall", "Orders", "Scores", "Downloads", "Tickets")
BAR_COLORS = ((60, 110, 200), (220, 90, 50), (70, 160, 90), (150, 80, 170), (40, 40, 40))
STYLE = "pixmo_docs_charts"


def chart_questions(title: str, labels: List[str], values: List[int]) -> List[Tuple[str, str]]:
    """Every (question, answer) pair the chart supports."""
    top, bottom = int(np.argmax(values)), int(np.argmin(values))
    qa = [(f"What is the value of {label}?", str(v)) for label, v in zip(labels, values)]
    qa += [("How many bars are there?", str(len(labels))), ("What is the title of the chart?", title)]
    if values.count(values[top]) == 1:
        qa.append(("Which bar has the highest value?", labels[top]))
    if values.count(values[bottom]) == 1:
        qa.append(("Which bar has the lowest value?", labels[bottom]))
    a, b = labels[0], labels[-1]
    qa.append((f"What is the difference between {a} and {b}?", str(abs(values[0] - values[-1]))))
    return qa


def draw_chart(rng: np.random.Generator, height: int, width: int, title: str, labels: List[str],
               values: List[int]) -> np.ndarray:
    """A bar chart with value labels.  uint8[H, W, 3]."""
    k = 4 if min(height, width) <= 256 else 2
    img = Image.fromarray(paint_background(rng, height, width)).resize((width * k, height * k), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    H, W = height * k, width * k
    font = ImageFont.load_default(size=max(int(0.075 * min(H, W)), 4 * k))
    small = ImageFont.load_default(size=max(int(0.06 * min(H, W)), 4 * k))
    ink = (20, 20, 20)
    draw.text((W / 2, 0.06 * H), title, fill=ink, font=font, anchor="mm")
    left, right, top, bottom = 0.12 * W, 0.97 * W, 0.2 * H, 0.84 * H
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=k)
    vmax = max(values)
    scale = (bottom - top) / (vmax * 1.1)
    for tick in (0, vmax // 2, vmax):
        y = bottom - tick * scale
        draw.line([(left - 2 * k, y), (left, y)], fill=ink, width=k)
        draw.text((left - 3 * k, y), str(tick), fill=ink, font=small, anchor="rm")
    color = BAR_COLORS[int(rng.integers(len(BAR_COLORS)))]
    slot = (right - left) / len(values)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0, x1 = left + (i + 0.15) * slot, left + (i + 0.85) * slot
        y = bottom - value * scale
        draw.rectangle([x0, y, x1, bottom], fill=color)
        draw.text(((x0 + x1) / 2, y - k), str(value), fill=ink, font=small, anchor="mb")
        draw.text(((x0 + x1) / 2, bottom + 2 * k), label, fill=ink, font=small, anchor="mt")
    return np.asarray(img.reduce(k))


class ChartSource(SyntheticSource):
    """Bar charts with QA in the PixMo-Docs charts style.

    questions == 1: {"image", "style", "question", "answer", "metadata": {"answers": [answer], ...}}
    questions > 1: {"image", "message_list": [{"style", "question", "answer"}, ...]} (packed).
    """

    name = "charts"

    def __init__(self, num_examples: int, image_size: ImageSize = 224, seed: int = 0, questions: int = 3):
        super().__init__(num_examples, image_size, seed)
        if questions < 1:
            raise ValueError(f"ChartSource: questions must be >= 1, got {questions}")
        self.questions = int(questions)

    def _repr_fields(self):
        return dict(questions=self.questions)

    def generate(self, rng: np.random.Generator) -> Dict[str, Any]:
        h, w = self.image_size
        n = int(rng.integers(3, 7))
        labels = [str(x) for x in rng.choice(CATEGORIES[int(rng.integers(len(CATEGORIES)))], n, replace=False)]
        values = [int(v) for v in rng.integers(1, 21, n) * int(rng.choice([1, 5]))]
        title = str(rng.choice(TITLES))
        image = draw_chart(rng, h, w, title, labels, values)
        qa = chart_questions(title, labels, values)
        picks = rng.choice(len(qa), min(self.questions, len(qa)), replace=False)
        chart = dict(title=title, labels=labels, values=values, image_hw=(h, w))
        if self.questions == 1:
            question, answer = qa[int(picks[0])]
            return dict(image=image, style=STYLE, question=question, answer=answer,
                        metadata=dict(chart, answers=[answer]))
        return dict(image=image, metadata=chart,
                    message_list=[dict(style=STYLE, question=qa[i][0], answer=qa[i][1]) for i in picks])
