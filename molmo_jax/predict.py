"""Ask a Molmo checkpoint about an image; draw the points it answers with.

  python -m molmo_jax.predict --checkpoint Molmo-7B-D-0924/ --image cat.jpg --prompt "Point to the cat"
  python -m molmo_jax.predict --checkpoint run/ --tokenizer tok/ --requests requests.jsonl --out answers.jsonl
  python -m molmo_jax.predict --checkpoint Molmo2-8B/ --video clip.mp4 --prompt "Point to the ball"
  python -m molmo_jax.predict --checkpoint molmo2_run/ --image cat.jpg --prompt "Point to the cat"

One request: prints the answer; if it contains points, writes the image with the points drawn and
labelled to --draw (default: <image name>.points.png). Batch mode: each JSONL line is
{"image": path or URL (optional), "prompt": "...", "style": optional, "id": optional}; each output
line adds "answer" and "points" ([{"label", "points": [[x%, y%], ...]}]) and, when there are points
and --draw-dir is given, "drawing" (the PNG written there). A request that cannot be answered (a bad
JSON line, no prompt, a dead or hostile image URL, a file that is no image) gets an output line with
"error" instead, the others are answered, and the exit status is 1. Every error is one line on
stderr, never a traceback. Image URLs are fetched within --timeout seconds for the whole exchange
and --max-image-mb of body.

A Molmo2 checkpoint (a folder with config.json model_type "molmo2", tokenizer.json and
processor_config.json, or a Molmo2 run's training checkpoint, whose meta names its processor and
tokenizer; --tokenizer overrides the latter) answers one request about --image or --video
(inference/predictor_molmo2.py);
for a video it prints the sampled frames' indices and timestamps, and points in the answer are
drawn on those frames (html-v2 points and tracks on the frame whose time they name, v1 points on
every frame): an animated GIF (--draw, default <video name>.points.gif) and a contact
sheet PNG beside it (.png). A video that cannot be decoded is one error line, exit status 1.
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from data_pipelines import images as images_lib, video as video_lib
from data_pipelines.jsonl import UnreadableFile, read_lines
from molmo_jax.convert.links import CheckpointError
from molmo_jax.inference.drawing import contact_sheet, draw_frames, draw_points, write_gif
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import IMAGE_FETCH, Predictor, Request, read_image_source
from molmo_jax.inference.predictor_molmo2 import Molmo2Predictor, is_molmo2_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF Molmo folder or molmo-jax checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer file/folder (default: the checkpoint folder)")
    p.add_argument("--image", help="image path or URL")
    p.add_argument("--video", help="video file (Molmo2 checkpoints)")
    p.add_argument("--prompt", help="the question / instruction")
    p.add_argument("--style", help="formatting style (default user_qa: no prefix; e.g. vqa2, pointing; "
                                   "long_caption with --captioner)")
    p.add_argument("--captioner", action="store_true",
                   help="a stage-1 captioning checkpoint: prompt ' long_caption 65:' without chat roles "
                        "(--prompt '' for a plain caption)")
    p.add_argument("--requests", help="JSONL of requests (batch mode)")
    p.add_argument("--out", help="JSONL of answers (batch mode; default: stdout)")
    p.add_argument("--draw", help="PNG for the drawn points (single request; a GIF for --video)")
    p.add_argument("--draw-dir", help="folder for drawn points (batch mode)")
    p.add_argument("--max-crops", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--weights", choices=("int8", "nf4"),
                   help="weight-only int8 or nf4 (4-bit NormalFloat) quantized inference (default: the checkpoint's "
                        "weights; a LoRA checkpoint runs its base + adapters unmerged either way)")
    p.add_argument("--timeout", type=float, default=IMAGE_FETCH.deadline,
                   help="seconds for the whole download of one image URL (connect, headers, body, retry)")
    p.add_argument("--max-image-mb", type=float, default=IMAGE_FETCH.max_bytes / 2**20,
                   help="largest image body downloaded from a URL, in MiB")
    return p


def _draw(image_source, groups, path: str, fetch_config) -> str:
    image = images_lib.load_image(read_image_source(image_source, fetch_config))
    draw_points(image, groups).save(path)
    return path


def read_requests(path: str, style: str) -> list[tuple[dict, Request | str]]:
    """(the JSONL object or {}, a Request or the one-line reason the line is not one) per non-blank line."""
    out = []
    for number, record, problem in read_lines(path):
        if problem is None and not isinstance(record, dict):
            problem = f"expected a JSON object, got {type(record).__name__}"
        if problem is None and not isinstance(record.get("prompt"), str):
            problem = "prompt: missing" if "prompt" not in record else "prompt: expected a string"
        if problem is None and not isinstance(record.get("image"), (str, type(None))):
            problem = "image: expected a path or URL string"
        if problem is not None:
            out.append((record if isinstance(record, dict) else {"line": number}, f"{path}:{number}: {problem}"))
        else:
            out.append((record, Request(record["prompt"], record.get("image"), record.get("style", style))))
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if (args.requests is None) == (args.prompt is None):
        raise SystemExit("give either --prompt (with an optional --image) or --requests FILE.jsonl")
    if not args.timeout > 0 or not args.max_image_mb > 0:
        raise SystemExit("error: --timeout and --max-image-mb must be positive")
    fetch_config = dataclasses.replace(IMAGE_FETCH, deadline=args.timeout, max_bytes=int(args.max_image_mb * 2**20))
    if is_molmo2_checkpoint(args.checkpoint) or args.video:
        return _molmo2_main(args, fetch_config)
    style = args.style or ("long_caption" if args.captioner else "user_qa")
    try:
        requests = read_requests(args.requests, style) if args.requests else None
        predictor = Predictor.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, max_crops=args.max_crops,
                                              dtype=args.dtype, captioner=args.captioner, fetch_config=fetch_config,
                                              weights=args.weights)
    except (UnreadableFile, CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        [answer] = predictor.predict([Request(args.prompt, args.image, style)], config)
        if answer.error:
            raise SystemExit(f"error: {answer.error}")
        print(answer.text)
        if answer.points and args.image:
            stem = os.path.splitext(os.path.basename(args.image.split("?")[0]))[0] or "image"
            path = _draw(args.image, answer.points, args.draw or stem + ".points.png", fetch_config)
            print(f"points drawn in {path}")
        return 0

    valid = [r for _, r in requests if isinstance(r, Request)]
    answers = iter(predictor.predict(valid, config, batch_size=args.batch_size))
    if args.draw_dir:
        os.makedirs(args.draw_dir, exist_ok=True)
    failed = 0
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for index, (record, request) in enumerate(requests):
            answer = next(answers) if isinstance(request, Request) else None
            error = request if answer is None else answer.error
            if error:
                failed += 1
                print(f"error: {error}", file=sys.stderr)
                out.write(json.dumps({**record, "error": error}, ensure_ascii=False) + "\n")
                continue
            row = {**record, "answer": answer.text, "points": [dataclasses.asdict(g) for g in answer.points]}
            if answer.points and args.draw_dir and record.get("image"):
                name = f"{record.get('id', index)}.png"
                row["drawing"] = _draw(record["image"], answer.points, os.path.join(args.draw_dir, name), fetch_config)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"{failed} of {len(requests)} requests not answered (error lines above and in the output)",
              file=sys.stderr)
    return 1 if failed else 0


def _stem(path: str, default: str) -> str:
    return os.path.splitext(os.path.basename(path.split("?")[0]))[0] or default


def _draw_video(video: str, answer, path: str) -> list[str]:
    """The sampled frames with the answer's points: an animated GIF at `path` and a contact sheet PNG."""
    frames = video_lib.iter_frames(video_lib.probe(video), answer.frame_indices)
    drawn = draw_frames(frames, answer.points, answer.timestamps)
    spacing = float(np.median(np.diff(answer.timestamps))) if len(answer.timestamps) > 1 else 0.5
    gif = write_gif(drawn, path, spacing)
    sheet = os.path.splitext(path)[0] + ".png"
    contact_sheet(drawn, [f"{t:.1f} s (frame {i})" for i, t in zip(answer.frame_indices, answer.timestamps)]
                  ).save(sheet)
    return [gif, sheet]


def _molmo2_main(args, fetch_config) -> int:
    """One request to a Molmo2 checkpoint folder: an image, a video or text only."""
    if args.requests is not None:
        raise SystemExit("error: --requests (batch mode) is not supported for Molmo2 checkpoints; give --prompt")
    if args.video and not is_molmo2_checkpoint(args.checkpoint):
        raise SystemExit(f"error: --video needs a Molmo2 checkpoint (a folder with config.json model_type 'molmo2', "
                         f"or a Molmo2 run's training checkpoint); "
                         f"{args.checkpoint} is not one")
    if args.video and args.image:
        raise SystemExit("error: give --image or --video, not both")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    try:
        predictor = Molmo2Predictor.from_checkpoint(args.checkpoint, dtype=args.dtype, fetch_config=fetch_config,
                                                    weights=args.weights, tokenizer=args.tokenizer)
        answer = predictor.predict(args.prompt, images=[args.image] if args.image else [], video=args.video,
                                   config=config)
        print(answer.text)
        if answer.frame_indices is not None:
            print("frames: " + " ".join(f"{i}@{t:.2f}s" for i, t in zip(answer.frame_indices, answer.timestamps)))
        if answer.points and args.video:
            paths = _draw_video(args.video, answer, args.draw or _stem(args.video, "video") + ".points.gif")
            print(f"points drawn in {' and '.join(paths)}")
        elif answer.points and args.image:
            path = _draw(args.image, answer.points, args.draw or _stem(args.image, "image") + ".points.png", fetch_config)
            print(f"points drawn in {path}")
    except (UnreadableFile, CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        # ValueError covers RequestError, video.VideoDecodeError and the processor's input errors.
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
