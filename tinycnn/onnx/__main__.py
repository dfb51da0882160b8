"""`python -m tinycnn.onnx MODEL.keras OUT.onnx`: export a saved model to ONNX (see tinycnn.onnx)."""
import argparse
import os
import sys

from ..errors import WeightsFileError
from ..models import load_model
from . import DEFAULT_OPSET, export


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinycnn.onnx",
                                     description="Export a saved model (a .keras file) to ONNX.")
    parser.add_argument("model", help="a .keras model file, written by tinycnn or by Keras")
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--channels-first", action="store_true", help="take and return NCHW images")
    parser.add_argument("--no-fold", action="store_true", help="keep BatchNormalization as its own ONNX node")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, compile=False, device="cpu")
        proto = export(model, args.out, channels_first=args.channels_first, fold_batchnorm=not args.no_fold,
                       opset=args.opset)
    except (WeightsFileError, ValueError, ImportError, OSError) as exc:
        print(f"tinycnn.onnx: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(proto.graph.node)} nodes, opset {args.opset}, "
          f"{os.path.getsize(args.out):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
