"""`python -m scratchvit.demo [--checkpoint CHECKPOINT] [--port 8000] [--host 127.0.0.1] [--device cpu|gpu]
[--no-shift-average]`

Parses the options, loads the model and serves the page until Ctrl-C; without --checkpoint, the model
shipped in the package (scratchvit/pretrained.py), which the first line names. Errors a user can fix are one
line with a non-zero exit status, as in train_mnist.py: 1 for a checkpoint that is missing, damaged
or of another model, or a port that cannot be opened; 2 for a bad option, a missing GPU backend or
a missing Pillow.
"""
import argparse
import sys

from ..cupy_check import BackendUnavailable


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m scratchvit.demo",
                                     description="Draw a digit in a local web page and watch the ViT read it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint written by train_mnist.py (default: the model shipped "
                                             "in the package, scratchvit/models/mnist_vit.npz)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    # loopback only unless asked: the page has no login, and anyone who reaches it can use the model
    parser.add_argument("--host", default="127.0.0.1",
                        help="the interface to listen on (0.0.0.0: every interface, reachable from other machines)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--shift-average", action=argparse.BooleanOptionalAction, default=True,
                        help="answer the class probabilities averaged over the drawing and its eight one-pixel "
                             "shifts, as predict does; --no-shift-average: of the drawing alone, one forward pass "
                             "(the attention maps are the drawing's either way)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    return parser


def _error(message, status):
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:       # --help (0) or a bad option (2): return the status instead of exiting
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if not 0 <= args.port <= 65535:
        return _error(f"--port must be from 0 to 65535, got {args.port}", 2)
    from ..predict import load_trained_model
    from ..checkpoint import CheckpointError
    from ..pretrained import PRETRAINED_PATH, shipped_model_line
    from .api import Demo
    from .server import make_server
    checkpoint = args.checkpoint or PRETRAINED_PATH
    try:
        model, meta = load_trained_model(checkpoint, device=args.device)
    except BackendUnavailable as error:
        return _error(error, 2)
    except CheckpointError as error:
        return _error(error, 1)
    try:
        demo = Demo(model, shift_average=args.shift_average)
    except ImportError as error:        # the preprocessing's Pillow; its message says what to install
        return _error(error, 2)
    try:
        server = make_server(demo, args.host, args.port, log=(lambda line: None) if args.quiet else None)
    except OSError as error:
        demo.close()
        return _error(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}", 1)
    # Every thread the demo starts (the HTTP workers, the model thread) is a daemon and every wait for
    # them on the way out is bounded (server_close, demo.close), so Ctrl-C ends the process even with
    # a slow client or a forward pass in progress.
    try:
        model_text = f"model from {checkpoint}" if args.checkpoint else shipped_model_line(args.shift_average)
        print(f"scratchvit demo: {server.url}  ({model_text}; Ctrl-C stops)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: listening on {args.host}: whoever can reach this port can use the page; it answers "
                  f"requests addressed to {server.url_host} (and localhost) only", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
