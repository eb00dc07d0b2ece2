"""tabwrite: write, press Tab, pick a continuation.

    python app.py                      # embedded Gemma 3 270M on http://127.0.0.1:7860
    python app.py --model smollm2-135m # the smaller embedded model
    python app.py --model gpt2         # any hub id (where the hub is reachable), folder or .gguf
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry


def parse_args(argv=None) -> argparse.Namespace:
    from models.registry import DEFAULT_MODEL, EMBEDDED

    parser = argparse.ArgumentParser(description="tabwrite: a Tab-completion editor on a local language model")
    parser.add_argument(
        "--model",
        default=os.environ.get("TABWRITE_MODEL", DEFAULT_MODEL),
        help=f"{', '.join(EMBEDDED)}, a hub id, a model folder or a .gguf file (default: {DEFAULT_MODEL})",
    )
    # On Spaces GRADIO_SERVER_NAME is set to 0.0.0.0; locally we stay on loopback.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from editor.service import SuggestService
    from editor.ui import build_demo
    from models.loading import ModelLoadError
    from models.registry import ModelNotFound

    service = SuggestService(args.model)
    try:
        engine = service.engine()  # load (and on first start, convert) before serving
    except (ModelNotFound, ModelLoadError) as e:
        print(f"tabwrite: {e}", file=sys.stderr)
        return 2
    print(f"[tabwrite] model {engine.name} ready on {engine.device.type}", file=sys.stderr, flush=True)
    demo = build_demo(service)
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
