"""What the demo leaves behind: the score table, the answers drawn on held-out images, the loss curve.

    write_report(workdir, before, after, sets, info) -> the table as text, and in workdir:
      scores.md, scores.json        scores before / after training, timings, run facts
      predictions.jsonl             every held-out answer of the trained model, with its scores
      answers/<task>_<i>.png        held-out images with the trained model's answer drawn
      images/<task>.png             the first held-out image of each task, as is
      loss_curve.png                training loss per step (from the trainer's metrics.jsonl)

`before` / `after` are `demo.evaluator.Evaluator.run` results.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from molmo_jax.inference.drawing import draw_points, find_points

# (key in scores, row title, higher is better, target of the issue or None)
ROWS = (
    ("pointing_f1", "pointing F1", True, 0.6),
    ("counting_accuracy", "counting accuracy (0-6)", True, 0.6),
    ("counting_accuracy_official_parser", "counting accuracy, official parser (never reads \"none\" as 0)", True, None),
    ("clock_hour_accuracy", "clock hour accuracy", True, 0.5),
    ("clock_accuracy", "clock accuracy (PixMo-Clocks tolerance)", True, None),
    ("caption_loss", "caption loss (held-out, per token)", False, None),
    # 0 when the answers come from the text alone; > 0 when the model reads the image.
    ("image_reliance", "image reliance (answer loss with swapped images - with own)", True, None),
)
DRAWN_PER_TASK = 8
PANEL = 336          # drawn images are scaled to this width so points and text stay readable


def one_line(scores: Mapping[str, float]) -> str:
    return "  ".join(f"{title.split(' (')[0]} {scores[key]:.3f}" for key, title, _, _ in ROWS)


def score_table(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """Markdown table: metric | untrained | trained | target."""
    lines = ["| metric | untrained | trained | target |", "|---|---:|---:|---:|"]
    for key, title, higher, target in ROWS:
        goal = "" if target is None else f">= {target:.2f} ({'met' if after[key] >= target else 'NOT met'})"
        lines.append(f"| {title} | {before[key]:.3f} | {after[key]:.3f} | {goal} |")
    return "\n".join(lines)


def loss_curve(metrics_path: str, png_path: str) -> int:
    """Plots loss per step from the trainer's metrics.jsonl; returns the number of steps drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, losses = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            steps.append(record["step"])
            losses.append(record["loss"])
    if not steps:
        raise ValueError(f"{metrics_path}: no training steps recorded")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.4, color="C0", label="loss")
    if len(losses) >= 10:
        k = max(len(losses) // 25, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="C0", lw=2, label=f"mean of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per response token)")
    ax.set_title("molmo-jax demo: tiny Molmo on synthetic scenes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return len(steps)


def _panel(image: np.ndarray, lines: List[str]) -> Image.Image:
    """The image scaled to PANEL px wide with text lines below it."""
    img = Image.fromarray(np.asarray(image)).convert("RGB")
    img = img.resize((PANEL, round(img.height * PANEL / img.width)), Image.NEAREST)
    font = ImageFont.load_default(size=12)
    wrapped = []
    for line in lines:
        while len(line) > 50:
            cut = line.rfind(" ", 0, 50)
            cut = 50 if cut <= 0 else cut
            wrapped.append(line[:cut])
            line = "  " + line[cut:].lstrip()
        wrapped.append(line)
    out = Image.new("RGB", (img.width, img.height + 6 + 15 * len(wrapped)), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(wrapped):
        draw.text((4, img.height + 3 + 15 * i), line, fill="black", font=font)
    return out


def draw_answers(folder: str, sets: Mapping[str, List[Dict[str, Any]]], records: Mapping[str, List[Dict]],
                 per_task: int = DRAWN_PER_TASK) -> List[str]:
    """PNGs of the first `per_task` held-out examples of each task with the model's answer drawn:
    points (numbered), the count it stated, the time it read; the truth below each."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for task, examples in records.items():
        for i, (example, record) in enumerate(list(zip(sets[task], examples))[:per_task]):
            answer = record["prediction"]
            image = np.asarray(example["image"])
            if task in ("pointing", "counting"):
                groups = find_points(answer)
                image = np.asarray(draw_points(image, groups, radius=max(2, image.shape[1] // 40)))
                label = example["truth"]["label"]
                if task == "pointing":
                    verdict = f"F1 {record['f1']:.2f} ({len(record['points'])} points, {len(record['gt_points_px'])} true)"
                    lines = [f"Q: point to {label}", f"A: {_short(answer)}", verdict]
                else:
                    stated = "no count" if record["count"] is None else f"count {record['count']}"
                    lines = [f"Q: how many {label}?", f"A: {_short(answer)}",
                             f"{stated}, truth {record['gt_count']}: {'right' if record['correct'] else 'wrong'}"]
            else:
                truth = example["truth"]["answer"]
                lines = ["Q: What time is being shown?", f"A: {_short(answer)}", f"truth: {truth}",
                         f"hour {'right' if record['hour_correct'] else 'wrong'}, "
                         f"within tolerance: {'yes' if record['overall_close'] else 'no'}"]
            if i == 0:  # the plain image too, to ask `molmo_jax.predict` about
                raw = os.path.join(os.path.dirname(folder), "images", f"{task}.png")
                os.makedirs(os.path.dirname(raw), exist_ok=True)
                Image.fromarray(np.asarray(example["image"])).save(raw)
            path = os.path.join(folder, f"{task}_{i}.png")
            _panel(image, lines).save(path)
            paths.append(path)
    return paths


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def write_report(workdir: str, before: Mapping[str, Any], after: Mapping[str, Any],
                 sets: Mapping[str, List[Dict[str, Any]]], info: Mapping[str, Any]) -> str:
    """Writes every artefact (module docstring) and returns the summary printed at the end."""
    table = score_table(before["scores"], after["scores"])
    steps = loss_curve(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"))
    drawn = draw_answers(os.path.join(workdir, "answers"), sets, after["records"])
    with open(os.path.join(workdir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for task, records in after["records"].items():
            for i, record in enumerate(records):
                f.write(json.dumps({"task": task, "index": i, **record}) + "\n")
    facts = (f"{info['steps']} steps of batch {info['batch']}: training {info['train_seconds'] / 60:.1f} min, whole demo "
             f"{info['total_seconds'] / 60:.1f} min ({info['cpu_seconds'] / 60:.1f} CPU-min); {info['eval_examples']} "
             f"held-out scenes per task ({info['held_out_overlap']} of them among the first training images)")
    zero = sum(r["gt_count"] == 0 for r in after["records"]["counting"])
    if zero:
        facts += (f"\ncounting: {zero} of {len(after['records']['counting'])} scenes ask for an absent shape (count 0); "
                  "\"There are none.\" reads as 0 there, as the official PixMo-Count parser means to but never does")
    with open(os.path.join(workdir, "scores.json"), "w", encoding="utf-8") as f:
        json.dump({"before": before["scores"], "after": after["scores"], **info, "loss_steps": steps}, f, indent=1)
    with open(os.path.join(workdir, "scores.md"), "w", encoding="utf-8") as f:
        f.write(f"# molmo-jax demo\n\n{table}\n\n{facts}\n")
    return (f"\n{table}\n\n{facts}\n"
            f"answers drawn: {os.path.dirname(drawn[0]) if drawn else '-'} ({len(drawn)} PNGs); "
            f"loss curve: {os.path.join(workdir, 'loss_curve.png')}; checkpoint: {os.path.join(workdir, 'checkpoints')}\n")
