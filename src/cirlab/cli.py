"""The `cirlab` command. Every argument is parsed here and nowhere else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cirlab.config import ConfigError

EPILOG = "Settings: --set section.key=value (repeatable), e.g. --set train.iterations=2000 --set model.name=concat"


def _cmd_make_css(args: argparse.Namespace) -> None:
    from cirlab.data.css import generate_css

    out = generate_css(Path(args.out), preset=args.preset, seed=args.seed, image_size=args.image_size)
    print(f"wrote CSS ({args.preset}, seed {args.seed}) to {out}")


def _cmd_check(args: argparse.Namespace) -> int:
    from cirlab.data.check import check_dataset

    problems = check_dataset(Path(args.root), args.format)
    for problem in problems:
        print(problem)
    print(f"{args.root}: {len(problems)} problem(s) found ({args.format} format)")
    return 1 if problems else 0


def _cmd_train(args: argparse.Namespace) -> None:
    from cirlab.config import load_config
    from cirlab.train import train

    config = load_config(args.config, args.set)
    result = train(config, Path(args.out), resume=args.resume)
    print(f"best validation {json.dumps(result.best_val)}; checkpoint: {result.run_dir / 'best'}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from cirlab.evaluate import evaluate_checkpoint, write_result

    result = evaluate_checkpoint(Path(args.checkpoint), args.set, split_name=args.split)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{args.split}"
    print(write_result(result, out))
    print(f"wrote {out}.json and {out}.md")


def _cmd_demo(args: argparse.Namespace) -> None:
    from cirlab.demo import run_demo

    run_demo(Path(args.out), Path(args.config), data_root=Path(args.data) if args.data else None)


def _cmd_models(args: argparse.Namespace) -> None:
    from cirlab.models.registry import available_models

    print("\n".join(available_models()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cirlab", description="Composed image retrieval: data, training, evaluation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="generate and check datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    make_css = data_commands.add_parser("make-css", help="write a synthetic CSS dataset in the real CSS format")
    make_css.add_argument("out", help="output folder")
    make_css.add_argument("--preset", choices=["demo", "full"], default="demo",
                          help="demo: small, for a 5-minute CPU run; full: TIRG scale (~16K queries per split)")
    make_css.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    make_css.add_argument("--image-size", type=int, default=64, help="pixels; the drawing scales with it")
    make_css.set_defaults(func=_cmd_make_css)
    check = data_commands.add_parser("check", help="list every missing image and malformed record of a dataset")
    check.add_argument("root", help="dataset folder")
    check.add_argument("--format", required=True,
                       choices=["css", "fashioniq", "cirr", "shoes", "fashion200k", "mitstates", "folder"])
    check.set_defaults(func=_cmd_check)

    train = commands.add_parser("train", help="train a model from a YAML config", epilog=EPILOG)
    train.add_argument("--config", help="YAML run config, e.g. configs/css/tirg.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    train.add_argument("--out", required=True, help="run folder (checkpoints best/ and last/, metrics.jsonl)")
    train.add_argument("--resume", action="store_true", help="continue exactly from OUT/last")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="Recall@K of a checkpoint under its benchmark's protocol",
                                   epilog="Protocol choices use the same syntax: --set protocol.ks=[1,10]")
    evaluate.add_argument("checkpoint", help="checkpoint folder (RUN/best)")
    evaluate.add_argument("--split", choices=["test", "train"], default="test")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    evaluate.add_argument("--out", help="output path without extension (default: RUN/eval-SPLIT)")
    evaluate.set_defaults(func=_cmd_eval)

    demo = commands.add_parser("demo", help="generate demo CSS, train image-only/concat/TIRG, report")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--config", default="configs/css/demo.yaml", help="the demo's training recipe")
    demo.add_argument("--data", help="use this CSS folder instead of generating OUT/data")
    demo.set_defaults(func=_cmd_demo)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cirlab.checkpoint import CheckpointError
    from cirlab.data.errors import DataFormatError

    try:
        code = args.func(args)
    except (ConfigError, DataFormatError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"cirlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cirlab: interrupted", file=sys.stderr)
        return 130
    return code or 0
