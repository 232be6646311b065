"""An HTTP server for a detector: `cascadevision serve CKPT_OR_EXPORTED_FILE`, or in Python

    from cascadevision.serve import create_app, load_predictor
    app = create_app(load_predictor("runs/demo/checkpoints/final.pth"))  # any ASGI server runs it

See `serve.app` for the endpoints and what they answer.
"""
from .app import create_app, decode_image, keep_scoring
from .predictor import Predictor, load_predictor
from .server import run_server

__all__ = ["Predictor", "create_app", "decode_image", "keep_scoring", "load_predictor", "run_server"]
