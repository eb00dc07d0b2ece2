"""tabwrite: write, press Tab, pick a continuation.

    python app.py                      # embedded Gemma 3 270M on http://127.0.0.1:7860
    python app.py --model smollm2-135m # the smaller embedded model
    python app.py --model gpt2         # any hub id (where the hub is reachable), folder or .gguf
    python app.py --backend openai --endpoint http://gpu-box:8000   # the model runs on vLLM / TGI / llama.cpp
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry
import models  # noqa: E402,F401  (OpenMP's wait policy, set before anything loads PyTorch: models/__init__.py)


def parse_args(argv=None) -> argparse.Namespace:
    from models.registry import DEFAULT_MODEL, EMBEDDED

    parser = argparse.ArgumentParser(description="tabwrite: a Tab-completion editor on a local language model")
    parser.add_argument(
        "--model",
        default=os.environ.get("TABWRITE_MODEL"),
        help=f"{', '.join(EMBEDDED)}, a hub id, a model folder or a .gguf file (default: {DEFAULT_MODEL}); "
        "with --backend openai, the server's model id (default: the first it lists)",
    )
    parser.add_argument(
        "--models",
        default=os.environ.get("TABWRITE_MODELS"),
        help="comma-separated models visitors may choose among (names, hub ids, folders, .gguf files; default: "
        "the embedded models that are installed); --model is always one of them. Nothing else is ever loaded",
    )
    parser.add_argument(
        "--backend",
        choices=["local", "openai"],
        default=os.environ.get("TABWRITE_BACKEND", "local"),
        help="local: run the model in this process (default); openai: send the requests to --endpoint",
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("TABWRITE_ENDPOINT"),
        help="URL of an OpenAI-compatible completions server (vLLM, TGI, llama.cpp), e.g. http://127.0.0.1:8000; "
        "an API key, if it needs one, goes in $TABWRITE_API_KEY",
    )
    # On Spaces GRADIO_SERVER_NAME is set to 0.0.0.0; locally we stay on loopback.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    parser.add_argument(
        "--personalize",
        action=argparse.BooleanOptionalAction,
        default={"1": True, "0": False}.get(os.environ.get("TABWRITE_PERSONALIZE", "")),
        help="let writers learn their style here (train an adapter on this CPU: one at a time, bounded). "
        "Default: on when only this machine can reach the app (--host 127.0.0.1, no --share, not on Spaces)",
    )
    return parser.parse_args(argv)


def personalize_allowed(args: argparse.Namespace) -> bool:
    """Learning styles takes minutes of CPU: where anyone can reach the app, only if the operator said so."""
    if args.personalize is not None:
        return args.personalize
    return args.host in ("127.0.0.1", "localhost", "::1") and not args.share and not os.environ.get("SPACE_ID")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend not in ("local", "openai"):  # from $TABWRITE_BACKEND, which argparse does not check
        print(f"tabwrite: unknown backend '{args.backend}' (use local or openai)", file=sys.stderr)
        return 2
    from editor.service import SuggestService
    from editor.ui import build_demo, calm_queue
    from models.core import EngineError
    from models.registry import DEFAULT_MODEL, Catalog, ModelLoadError, ModelNotFound

    try:
        if args.backend == "openai":
            from models.remote import OpenAICompletionsBackend

            # Ask the server for its models and what it supports before serving.
            backend = OpenAICompletionsBackend.connect(args.endpoint, args.model, os.environ.get("TABWRITE_API_KEY"))
            service = SuggestService(backend.model, backend=backend)
            print(f"[tabwrite] {backend.endpoint}: {backend.features.describe()}", file=sys.stderr, flush=True)
        else:
            model = args.model or DEFAULT_MODEL
            catalog = Catalog.for_app(model, args.models)
            service = SuggestService(catalog.names[0], catalog=catalog, personalize=personalize_allowed(args))
        engine = service.engine()  # load (and on first start, convert) before serving
    except (ModelNotFound, ModelLoadError, EngineError) as e:
        print(f"tabwrite: {e}", file=sys.stderr)
        return 2
    print(f"[tabwrite] model {engine.name} ready on {engine.device.type}", file=sys.stderr, flush=True)
    demo = build_demo(service)
    from starlette.middleware import Middleware

    from editor.guard import BodyLimit, RequestRate, UploadLimit, max_request_bytes

    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
        # Every request's body is bounded before Gradio reads it, and each visitor's rate of
        # requests (editor/guard.py); uploads too, and they are refused where no feature takes them.
        app_kwargs={"middleware": [
            Middleware(RequestRate), Middleware(BodyLimit, max_bytes=max_request_bytes()),
            Middleware(UploadLimit, enabled=service.styles.enabled),
        ]},
        max_file_size=max_request_bytes(),
    )
    calm_queue(demo)  # Gradio's idle queue loop, every 5 ms instead of every 1 (editor/ui.py)
    try:
        # The default model's forward passes run here, on the thread that loaded it (faster on
        # CPU; see models/scheduler.py serve_here). Other models get a thread of their own.
        engine.serve()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
