"""Keras 3 side of the benchmark: the Week2 model, its training step, epoch, inference and
single kernels. Prints one JSON object (schema in common.py).

    python benchmarks/bench_keras.py [--repeats 3] [--steps 50] [--quick] [--skip-epoch]

On TensorFlow's CPU backend by default. KERAS_BACKEND=jax runs it on JAX instead (on the GPU
where JAX has one; the framework is then reported as "keras-jax", without the single kernels,
which are TensorFlow ops).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

FRAMEWORK = "keras"


def build_model(keras):
    layers = [keras.Input(C.INPUT_SHAPE)]
    for spec in C.WEEK2_LAYERS:
        kind = spec[0]
        if kind == "conv":
            _, filters, k, relu = spec
            layers.append(keras.layers.Conv2D(filters, k, activation="relu" if relu else None,
                                              use_bias=False))
        elif kind == "bn":
            layers.append(keras.layers.BatchNormalization(momentum=C.BN_MOMENTUM,
                                                          epsilon=C.BN_EPSILON))
        elif kind == "dropout":
            layers.append(keras.layers.Dropout(spec[1]))
        elif kind == "maxpool":
            layers.append(keras.layers.MaxPooling2D(spec[1]))
        elif kind == "gap":
            layers.append(keras.layers.GlobalAveragePooling2D())
        elif kind == "softmax":
            layers.append(keras.layers.Activation("softmax"))
        else:
            raise ValueError(kind)
    return keras.Sequential(layers)


def main():
    C.claim_stdout()
    args = C.parse_args(__doc__)
    counts = C.Counts.from_args(args)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["KERAS_BACKEND"] == "jax":
        return main_jax(args, counts)
    try:
        import tensorflow as tf
    except ImportError as exc:
        C.missing(FRAMEWORK, f"cannot import tensorflow: {exc}")
    # must happen before TensorFlow's runtime starts
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        import keras
    except ImportError as exc:
        C.missing(FRAMEWORK, f"cannot import keras: {exc}")
    if keras.backend.backend() != "tensorflow":
        C.missing(FRAMEWORK, f"Keras backend is {keras.backend.backend()!r}, need 'tensorflow' "
                             "(set KERAS_BACKEND=tensorflow)")
    keras.utils.set_random_seed(C.SEED)

    result = C.new_result(FRAMEWORK, keras.__version__,
                          tf.config.threading.get_intra_op_parallelism_threads(), counts=counts)
    result["tensorflow"] = tf.__version__
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 Linux builds)")
    notes = [f"keras {keras.__version__} on tensorflow {tf.__version__} (CPU), intra-op threads "
             f"{tf.config.threading.get_intra_op_parallelism_threads()}, inter-op "
             f"{tf.config.threading.get_inter_op_parallelism_threads()}, "
             f"TF_ENABLE_ONEDNN_OPTS={onednn}"]
    measure(keras, result, notes, counts)
    if not args.no_kernels:
        result["kernels"] = kernels(tf, keras, counts, notes)
    result["notes"] = "; ".join(notes)
    C.emit(result)


def main_jax(args, counts):
    """The same measurements on Keras's JAX backend (XLA-compiled steps), on JAX's default device."""
    try:
        import jax
        import keras
    except ImportError as exc:
        C.missing("keras-jax", f"cannot import keras on jax: {exc}")
    keras.utils.set_random_seed(C.SEED)
    device = jax.devices()[0]
    result = C.new_result("keras-jax", keras.__version__, args.threads,
                          device="gpu" if device.platform == "gpu" else device.platform, counts=counts)
    result["jax"] = jax.__version__
    notes = [f"keras {keras.__version__} on jax {jax.__version__}, device {device.device_kind} ({device.platform})"]
    measure(keras, result, notes, counts)
    result["notes"] = "; ".join(notes)
    C.emit(result)


def measure(keras, result, notes, counts):
    """Step, epoch, inference and one-image latency of the Week2 model, into `result`."""

    C.log("making data")
    x_train, y_train, x_test, y_test = C.make_data()
    y_train1, y_test1 = C.one_hot(y_train), C.one_hot(y_test)
    xb, yb = C.step_batch(x_train, y_train1)

    model = build_model(keras)
    model.compile(optimizer=keras.optimizers.Adam(**C.ADAM), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    result["params"] = int(model.count_params())
    if result["params"] != C.EXPECTED_PARAMS:
        notes.append(f"WARNING: {result['params']} params, expected {C.EXPECTED_PARAMS}")
    notes.append(f"model.compile(Adam(0.003, 0.9, 0.999, 1e-7), categorical_crossentropy on the "
                 f"softmax output, one-hot labels, metrics=[accuracy]); jit_compile resolved to "
                 f"{model.jit_compile} (Keras disables XLA on CPU-only machines)")

    # ---- training step ------------------------------------------------------------------
    def train_step():
        return model.train_on_batch(xb, yb)

    C.log("step: first step (traces the train function) + warm-up")
    first_s = C.time_once(train_step)
    runs = C.time_per_call(train_step, counts.steps, counts.repeats, warmup=counts.warmup_steps)
    result["step_ms"] = C.stats(runs)
    result["compile_s"] = C.compile_seconds(first_s, result["step_ms"])
    C.log(f"step: {result['step_ms']['median']:.2f} ms (first step {first_s * 1e3:.1f} ms)")
    notes.append("step = model.train_on_batch (the backend's compiled train step + Keras' "
                 "per-call Python overhead); compile_s = first call (tracing) minus a steady call")

    # ---- epoch -----------------------------------------------------------------------------
    if counts.epoch:
        wx, wy, wvx, wvy = C.warmup_subset(x_train, y_train1, x_test, y_test1)
        C.log("epoch: warm-up fit on a subset")
        model.fit(wx, wy, batch_size=C.BATCH, epochs=1, validation_data=(wvx, wvy),
                  shuffle=True, verbose=0)
        ep = []
        for r in range(counts.repeats):
            C.log(f"epoch {r + 1}/{counts.repeats}")
            ep.append(C.time_once(lambda: model.fit(
                x_train, y_train1, batch_size=C.BATCH, epochs=1,
                validation_data=(x_test, y_test1), shuffle=True, verbose=0)))
            C.log(f"epoch {r + 1}: {ep[-1]:.2f} s")
        result["epoch_s"] = C.stats(ep)
        notes.append("epoch = model.fit(x, y, batch_size=128, epochs=1, validation_data=test, "
                     "shuffle=True, verbose=0) from NumPy arrays, after a warm-up fit on a "
                     "352/272-image subset that traces every batch shape")
    result["peak_rss_mb"] = C.peak_rss_mb()

    # ---- inference -------------------------------------------------------------------------
    def predict():
        return model.predict(x_test, batch_size=C.PREDICT_BATCH, verbose=0)

    C.log("inference")
    predict()
    result["inference_s"] = C.stats(C.time_per_call(predict, 1, counts.repeats, scale=1.0))
    notes.append("inference = model.predict(x_test, batch_size=1000, verbose=0) after one "
                 "warm-up predict")

    # One image: model(x, training=False) (Keras's own advice for small inputs; predict() builds a
    # dataset and runs its loop for every call, tens of milliseconds)
    one = x_test[:1]

    def predict_one():
        return keras.ops.convert_to_numpy(model(one, training=False))

    C.log("predict one image")
    result["predict_one_ms"] = C.stats(C.time_per_call(predict_one, C.PREDICT_ONE_CALLS, counts.repeats, warmup=10))
    notes.append("predict_one = model(x_test[:1], training=False) to NumPy (model.predict on one image costs far more)")


def kernels(tf, keras, counts, notes):
    """Single-op timings, ms per call, NHWC, each op wrapped in its own tf.function so the
    graph kernel is timed rather than eager Python dispatch."""
    out = {}

    def t(name, fn, *tensors):
        f = tf.function(fn, jit_compile=False)
        out[name] = C.kernel_stats(lambda: f(*tensors), counts)
        C.log(f"kernel {name}: {out[name]['median']:.3f} ms")

    strides = [1, 1, 1, 1]
    for i, name in enumerate(C.CONVS):
        s = C.conv_shapes(name)
        x = tf.constant(C.random_array(s["x"], 10 + i))
        w = tf.constant(C.random_array(s["w"], 20 + i))
        gy = tf.constant(C.random_array(s["y"], 30 + i))
        x_sizes = tf.constant(s["x"], dtype=tf.int32)
        w_sizes = tf.constant(s["w"], dtype=tf.int32)
        t(f"{name}.fwd",
          lambda x, w: tf.nn.conv2d(x, w, strides=1, padding="VALID", data_format="NHWC"), x, w)
        t(f"{name}.bwd_data",
          lambda sz, w, gy: tf.raw_ops.Conv2DBackpropInput(
              input_sizes=sz, filter=w, out_backprop=gy, strides=strides, padding="VALID",
              data_format="NHWC"), x_sizes, w, gy)
        t(f"{name}.bwd_filter",
          lambda x, sz, gy: tf.raw_ops.Conv2DBackpropFilter(
              input=x, filter_sizes=sz, out_backprop=gy, strides=strides, padding="VALID",
              data_format="NHWC"), x, w_sizes, gy)

    # BatchNorm: Keras 3's BatchNormalization layer in training mode is not a fused op (it is
    # moments + batch_normalization + moving-average assigns), so time that layer itself.
    bn = keras.layers.BatchNormalization(momentum=C.BN_MOMENTUM, epsilon=C.BN_EPSILON)
    x = tf.constant(C.random_array(C.BN_SHAPE, 40))
    gy = tf.constant(C.random_array(C.BN_SHAPE, 41))
    bn.build(C.BN_SHAPE)

    def bn_fwd(x):
        return bn(x, training=True)

    def bn_fwd_bwd(x, gy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
        return tape.gradient(y, [x] + bn.trainable_weights, output_gradients=gy)

    t("batchnorm.fwd_train", bn_fwd, x)
    t("batchnorm.fwd_bwd", bn_fwd_bwd, x, gy)
    fwd, both = out["batchnorm.fwd_train"], out.pop("batchnorm.fwd_bwd")
    bwd_runs = [max(0.0, b - fwd["median"]) for b in both["runs"]]
    out["batchnorm.bwd"] = C.stats(bwd_runs)
    out["batchnorm.bwd"]["derived"] = "fwd+bwd minus median fwd"
    out["batchnorm.fwd_bwd"] = both

    # Fused TF BatchNorm kernels, for reference (what tf.keras 2 used with fused=True)
    c = C.BN_SHAPE[-1]
    scale, offset = tf.ones([c]), tf.zeros([c])
    empty = tf.constant([], tf.float32)
    t("batchnorm.fwd_train[fused]", lambda x: tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=C.BN_EPSILON,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)[:3], x)
    _, bmean, bvar, r1, r2, r3 = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=C.BN_EPSILON,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    t("batchnorm.bwd[fused]", lambda gy, x: tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=gy, x=x, scale=scale, reserve_space_1=r1, reserve_space_2=r2,
        reserve_space_3=r3, epsilon=C.BN_EPSILON, data_format="NHWC", is_training=True)[:3],
      gy, x)

    # MaxPool 2x2
    x = tf.constant(C.random_array(C.MAXPOOL_SHAPE, 50))
    y = tf.nn.max_pool2d(x, 2, 2, "VALID")
    gy = tf.constant(C.random_array(tuple(y.shape), 51))
    t("maxpool.fwd", lambda x: tf.nn.max_pool2d(x, 2, 2, "VALID"), x)
    t("maxpool.bwd", lambda x, y, gy: tf.raw_ops.MaxPoolGrad(
        orig_input=x, orig_output=y, grad=gy, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1],
        padding="VALID", data_format="NHWC"), x, y, gy)

    # Softmax + cross-entropy forward and backward (the fused logits op, mean over the batch)
    logits = tf.constant(C.random_array(C.SOFTMAX_SHAPE, 60))
    labels = tf.constant(C.one_hot(C.random_labels(C.BATCH, 61)))

    def ce(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits))
        return tape.gradient(loss, logits)
    t("softmax_ce.fwd_bwd", ce, logits, labels)

    # cost of calling a tf.function at all, to judge the smallest kernels against
    t("_noop", lambda x: x + 1.0, tf.zeros([1]))
    noop = out.pop("_noop")
    notes.append("kernels: NHWC; each op in its own tf.function(jit_compile=False), called once "
                 "per timed call, so every time includes the tf.function call overhead (about "
                 f"{noop['median'] * 1e3:.0f} us for a 1-element add); conv fwd = tf.nn.conv2d, "
                 "bwd_data = tf.raw_ops.Conv2DBackpropInput, bwd_filter = "
                 "tf.raw_ops.Conv2DBackpropFilter (VALID, stride 1); batchnorm.fwd_train = the "
                 "Keras 3 BatchNormalization layer (training=True: moments, normalize, "
                 "moving-average updates; not a fused op), batchnorm.bwd = its GradientTape "
                 "fwd+bwd (batchnorm.fwd_bwd) minus the median fwd; [fused] = TF's "
                 "FusedBatchNormV3/GradV3 for reference; maxpool = tf.nn.max_pool2d / "
                 "tf.raw_ops.MaxPoolGrad; softmax_ce = GradientTape of "
                 "softmax_cross_entropy_with_logits")
    return out


if __name__ == "__main__":
    main()
