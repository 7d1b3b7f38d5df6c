"""Serve a CALM or baseline over HTTP with an OpenAI-compatible completions API.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (prompt, max_tokens,
temperature in (0, 1], n, stop, seed, stream). Requests that arrive together are
batched: they share one forward per step (up to --max-batch rows, gathered for
--wait-ms); further requests wait in a queue of --max-queue, and a full queue
answers 503. CALM below temperature 1 samples with the likelihood-free samplers:
the batch sampler where T = 1/n (--num-candidates head samples per step), the
exact sampler otherwise (giving up after --max-calls draws in a step); a request
may set "sampler", "num_candidates" and "max_calls" itself.

Needs the serve extra: pip install 'calm-lm[serve]'. Ctrl-C stops it.

Examples:
  calm serve --model runs/calm
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "ROMEO:", "max_tokens": 32, "seed": 0}'
  python -c "import openai; c = openai.OpenAI(base_url='http://localhost:8000/v1', api_key='-');
             print(c.completions.create(model='calm', prompt='ROMEO:').choices[0].text)"
"""

from __future__ import annotations

import argparse

from calm.cli.common import add_runtime_flags, precision_of
from calm.errors import CalmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="CALM or baseline run/checkpoint folder (or an authors' folder)")
    p.add_argument("--name", default=None,
                   help="the model id clients ask for (default: the run folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most rows (prompts × n) decoded together in one forward")
    p.add_argument("--wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others to join")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch; more get 503")
    p.add_argument("--num-candidates", type=int, default=200,
                   help="CALM batch sampler: head samples per step (N), unless a request sets it")
    p.add_argument("--max-calls", type=int, default=100000,
                   help="CALM exact sampler: draws per step before giving up, unless a request sets it")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    add_runtime_flags(p)


def run(args) -> int:
    from pathlib import Path

    try:
        import uvicorn

        from calm.server import create_app
    except ImportError:
        raise CalmError("calm serve needs the serve extra: pip install 'calm-lm[serve]'") from None
    import calm
    from calm.runtime import pick_device, set_threads

    if not 0 < args.port < 65536:
        raise CalmError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_batch", "max_queue", "num_candidates", "max_calls"):
        if getattr(args, flag) < 1:
            raise CalmError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.wait_ms < 0:
        raise CalmError(f"--wait-ms must be at least 0, got {args.wait_ms}")
    set_threads(args.threads)
    device = pick_device(args.device)
    lm = calm.load(args.model, device=device)
    name = args.name or Path(args.model).resolve().name
    app = create_app(lm, model_id=name, max_batch=args.max_batch, wait_ms=args.wait_ms,
                     max_queue=args.max_queue, num_candidates=args.num_candidates,
                     max_calls=args.max_calls, precision=precision_of(args, device))
    print(f"serving {lm.kind} {lm.checkpoint} as {name!r} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
