"""Ask a Molmo checkpoint about an image; draw the points it answers with.

  python -m molmo_jax.predict --checkpoint Molmo-7B-D-0924/ --image cat.jpg --prompt "Point to the cat"
  python -m molmo_jax.predict --checkpoint run/ --tokenizer tok/ --requests requests.jsonl --out answers.jsonl

One request: prints the answer; if it contains points, writes the image with the points drawn and
labelled to --draw (default: <image name>.points.png). Batch mode: each JSONL line is
{"image": path or URL (optional), "prompt": "...", "style": optional, "id": optional}; each output
line adds "answer" and "points" ([{"label", "points": [[x%, y%], ...]}]) and, when there are points
and --draw-dir is given, "drawing" (the PNG written there).
"""
import argparse
import dataclasses
import json
import os
import sys

from data_pipelines import images as images_lib
from molmo_jax.evaluation.score import read_jsonl
from molmo_jax.inference.drawing import draw_points
from molmo_jax.inference.generate import GenerationConfig
from molmo_jax.inference.predictor import Predictor, Request, read_image_source


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
    return p


def _draw(image_source, groups, path: str) -> str:
    image = images_lib.load_image(read_image_source(image_source))
    draw_points(image, groups).save(path)
    return path


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if (args.requests is None) == (args.prompt is None):
        raise SystemExit("give either --prompt (with an optional --image) or --requests FILE.jsonl")
    style = args.style or ("long_caption" if args.captioner else "user_qa")
    predictor = Predictor.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, max_crops=args.max_crops,
                                          dtype=args.dtype, captioner=args.captioner)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        [answer] = predictor.predict([Request(args.prompt, args.image, style)], config)
        print(answer.text)
        if answer.points and args.image:
            stem = os.path.splitext(os.path.basename(args.image.split("?")[0]))[0] or "image"
            print(f"points drawn in {_draw(args.image, answer.points, args.draw or stem + '.points.png')}")
        return 0

    records = []
    for number, record in read_jsonl(args.requests):
        if "prompt" not in record:
            raise ValueError(f"{args.requests}:{number}: request has no 'prompt'")
        records.append(record)
    requests = [Request(r["prompt"], r.get("image"), r.get("style", style)) for r in records]
    answers = predictor.predict(requests, config, batch_size=args.batch_size)
    if args.draw_dir:
        os.makedirs(args.draw_dir, exist_ok=True)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for index, (record, answer) in enumerate(zip(records, answers)):
            row = {**record, "answer": answer.text, "points": [dataclasses.asdict(g) for g in answer.points]}
            if answer.points and args.draw_dir and record.get("image"):
                name = f"{record.get('id', index)}.png"
                row["drawing"] = _draw(record["image"], answer.points, os.path.join(args.draw_dir, name))
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
