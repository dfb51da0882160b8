"""The Week2 network of the seed document, layer for layer (12,516 parameters)."""
import tinycnn as tc
from tinycnn import layers as L


def build_week2_model(device=None, seed=None, dropout=0.1, dtype="float32", fuse=True):
    def conv(filters, size, **kw):
        return L.Conv2D(filters, size, use_bias=False, **kw)

    def block(filters, size):  # conv -> BN -> dropout, the seed's repeated unit
        return [conv(filters, size, activation="relu"), L.BatchNormalization(), L.Dropout(dropout)]

    return tc.Sequential(
        [
            conv(16, 3, activation="relu", input_shape=(28, 28, 1)), L.BatchNormalization(), L.Dropout(dropout),
            *block(16, 3),
            conv(10, 1, activation="relu"),
            L.MaxPooling2D(2),
            *block(10, 3),
            *block(16, 3),
            *block(16, 3),
            *block(16, 3),
            conv(10, 4),
            L.BatchNormalization(),
            L.GlobalAveragePooling2D(),
            L.Activation("softmax"),
        ],
        device=device,
        seed=seed,
        dtype=dtype,
        fuse=fuse,
    )
