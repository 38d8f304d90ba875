"""The ``plant-pipeline`` command: identify plants in photos, or serve the identify web service and its page.

    plant-pipeline identify PHOTO... [--model production|FOLDER] [--top-k 5] [--json]
    plant-pipeline serve [--host 127.0.0.1] [--port 8000] [--model production|FOLDER]

Exit status: 0 every photo answered, 1 some photos could not be read (one line each on stderr), 2 a usage error
(no production model, a bad option): its message, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from plant_pipeline.ml.errors import UsageError

if TYPE_CHECKING:
    from plant_pipeline.ml.serving.identifier import Identification

PROG = "plant-pipeline"
DEFAULT_TOP_K = 5


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="production",
                        help="'production' (the promoted model, the default) or a trained or promoted model folder")
    parser.add_argument("--data-dir", default=None,
                        help="where the production pointer lives (default: $PLANT_PIPELINE_DATA_DIR, else ./data)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    identify = commands.add_parser("identify", help="name the plant in each photo",
                                   description="Print the top guesses for each photo (any format Pillow reads).")
    identify.add_argument("photos", nargs="+", metavar="PHOTO")
    identify.add_argument("--top-k", type=_positive, default=None,
                          help=f"guesses per photo (default {DEFAULT_TOP_K}, or every category when there are fewer)")
    identify.add_argument("--json", action="store_true", help="one JSON object per photo and line, for scripts")
    _model_options(identify)

    serve = commands.add_parser("serve", help="run the web service and its page",
                                description="Serve POST /v1/identify, the page at / and /healthz with uvicorn.")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    serve.add_argument("--port", type=int, default=8000)
    _model_options(serve)
    serve.add_argument("--max-batch", type=_positive, default=16, help="photos scored in one forward, at most")
    serve.add_argument("--window-ms", type=float, default=10.0,
                       help="how long a request waits for others to share its batch")
    serve.add_argument("--max-queue", type=_positive, default=64,
                       help="photos that may wait; more are answered 503 with Retry-After")
    serve.add_argument("--watch-interval", type=float, default=2.0,
                       help="seconds between checks for a newly promoted model (0: never; production only)")
    return parser


def identify_photos(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from plant_pipeline.ml.serving.identifier import Identifier
    from plant_pipeline.ml.serving.photos import PhotoError, read_photo

    out, err = out or sys.stdout, err or sys.stderr
    identifier = Identifier.load(args.model, device=args.device, data_dir=args.data_dir)
    categories = len(identifier.categories)
    top_k = min(DEFAULT_TOP_K, categories) if args.top_k is None else args.top_k
    if top_k > categories:
        raise UsageError(f"--top-k {top_k} is more than the model's {categories} categories; pass at most {categories}")
    # Each photo is read on its own, so one bad file is reported and the others are still answered; a batch at a
    # time, so a thousand photos never sit decoded in memory together and answers appear as they are ready.
    failed = answered = 0
    for start in range(0, len(args.photos), identifier.max_batch):
        images, names = [], []
        for photo in args.photos[start:start + identifier.max_batch]:
            try:
                images.append(read_photo(photo, name=photo))
                names.append(photo)
            except PhotoError as error:
                print(f"{PROG}: {error}", file=err, flush=True)
                failed += 1
        for result in identifier.identify(images, top_k=top_k, names=names) if images else []:
            if args.json:
                print(json.dumps(result.to_json()), file=out, flush=True)
            else:
                print(("\n" if answered else "") + format_table(result), file=out, flush=True)
            answered += 1
    return 1 if failed else 0


def format_table(result: Identification) -> str:
    """One photo's guesses: rank, display name, score as a percentage."""
    width = max([len(guess.display_name) for guess in result.guesses] + [4])
    lines = [f"{result.photo}  (model {result.model_id}, data {result.data_version})",
             f"  {'#':>2}  {'name':<{width}}  {'score':>6}"]
    lines += [f"  {rank:>2}  {guess.display_name:<{width}}  {100 * guess.score:>5.1f}%"
              for rank, guess in enumerate(result.guesses, start=1)]
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from plant_pipeline.ml.serving.identifier import Identifier
    from plant_pipeline.service.app import create_app

    # Load before binding the port, so a missing model is one clear line instead of a failed startup.
    identifier = Identifier.load(args.model, device=args.device, data_dir=args.data_dir)
    app = create_app(identifier, model=args.model, data_dir=args.data_dir, device=args.device,
                     max_batch=args.max_batch, window_ms=args.window_ms, max_queue=args.max_queue,
                     watch_interval_s=args.watch_interval)
    logging.getLogger("plant_pipeline").setLevel(logging.INFO)  # model switches and scoring failures
    print(f"{PROG}: serving model {identifier.info.model_id} on http://{args.host}:{args.port}/", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    # stderr is for the user's messages (one line per bad photo), not transformers' "Loading weights" bar.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return identify_photos(args) if args.command == "identify" else serve(args)
    except UsageError as error:
        # A setting or input to change: the message says what to do; a traceback would only bury it.
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error of ours. Point stdout at /dev/null so that the
        # interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
