"""A local page where one draws a digit and watches the ViT read it: `python -m scratchvit.demo`.

The page (static/: plain HTML, CSS and JavaScript, no build step, nothing loaded from the network)
sends the drawing to this process as it is drawn; the model answers with its ten class
probabilities, the 28x28 input it saw after the MNIST-style preprocessing (scratchvit/preprocess.py,
the same as `python -m scratchvit.predict`), the attention rollout and the per-head attention maps
of one layer (scratchvit/attention_maps.py).

    api.py      the request and the answer, without HTTP: `Demo(model).answer(json_body)`
    server.py   the standard library's HTTPServer around it with a fixed pool of worker threads,
                on 127.0.0.1 by default
    __main__.py the command line: parse the options, load the checkpoint, serve

From Python:

    from scratchvit.predict import load_trained_model
    from scratchvit.demo import Demo, make_server
    model, meta = load_trained_model("runs/mnist/checkpoint.npz")
    server = make_server(Demo(model), "127.0.0.1", 0)      # port 0: any free port
    print(server.url); server.serve_forever()
"""
from .api import Demo, RequestError
from .server import MAX_BODY_BYTES, make_server

__all__ = ["Demo", "RequestError", "make_server", "MAX_BODY_BYTES"]
