"""Ask a Molmo checkpoint about an image; draw the points it answers with.

  python -m molmo_jax.predict --checkpoint Molmo-7B-D-0924/ --image cat.jpg --prompt "Point to the cat"
  python -m molmo_jax.predict --checkpoint run/ --tokenizer tok/ --requests requests.jsonl --out answers.jsonl

One request: prints the answer; if it contains points, writes the image with the points drawn and
labelled to --draw (default: <image name>.points.png). Batch mode: each JSONL line is
{"image": path or URL (optional), "prompt": "...", "style": optional, "id": optional}; each output
line adds "answer" and "points" ([{"label", "points": [[x%, y%], ...]}]) and, when there are points
and --draw-dir is given, "drawing" (the PNG written there). A request that cannot be answered (a bad
JSON line, no prompt, a dead or hostile image URL, a file that is no image) gets an output line with
"error" instead, the others are answered, and the exit status is 1. Every error is one line on
stderr, never a traceback. Image URLs are fetched within --timeout seconds for the whole exchange
and --max-image-mb of body.
"""
import argparse
import dataclasses
import json
import os
import sys

from data_pipelines import images as images_lib
from data_pipelines.jsonl import UnreadableFile, read_lines
from molmo_jax.convert.links import CheckpointError
from molmo_jax.inference.drawing import draw_points
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import IMAGE_FETCH, Predictor, Request, read_image_source


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m molmo_jax.predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF Molmo folder or molmo-jax checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer file/folder (default: the checkpoint folder)")
    p.add_argument("--image", help="image path or URL")
    p.add_argument("--prompt", help="the question / instruction")
    p.add_argument("--style", help="formatting style (default user_qa: no prefix; e.g. vqa2, pointing; "
                                   "long_caption with --captioner)")
    p.add_argument("--captioner", action="store_true",
                   help="a stage-1 captioning checkpoint: prompt ' long_caption 65:' without chat roles "
                        "(--prompt '' for a plain caption)")
    p.add_argument("--requests", help="JSONL of requests (batch mode)")
    p.add_argument("--out", help="JSONL of answers (batch mode; default: stdout)")
    p.add_argument("--draw", help="PNG for the drawn points (single request)")
    p.add_argument("--draw-dir", help="folder for drawn points (batch mode)")
    p.add_argument("--max-crops", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--weights", choices=("int8",), help="weight-only int8 quantized inference (default: the "
                   "checkpoint's weights; a LoRA checkpoint runs its base + adapters unmerged either way)")
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


if __name__ == "__main__":
    sys.exit(main())
