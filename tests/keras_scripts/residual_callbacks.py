import tinycnn as keras  # under Keras 3 this line reads: import keras
"""A functional residual network trained with EarlyStopping, ModelCheckpoint, CSVLogger and
ReduceLROnPlateau, then saved to a .keras file and loaded back."""
import csv
import os
import tempfile

import numpy as np

(x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
x_train = x_train[:3000][..., None].astype("float32") / 255
x_test = x_test[:1000][..., None].astype("float32") / 255
y_train, y_test = y_train[:3000], y_test[:1000]

keras.utils.set_random_seed(3)
inputs = keras.Input(shape=(28, 28, 1))
x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(inputs)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.Activation("relu")(x)
y = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
y = keras.layers.Conv2D(32, 3, padding="same")(y)
x = keras.layers.add([x, y])
x = keras.layers.Activation("relu")(x)
x = keras.layers.MaxPooling2D()(x)
x = keras.layers.GlobalAveragePooling2D()(x)
outputs = keras.layers.Dense(10, activation="softmax")(x)
model = keras.Model(inputs, outputs, name="residual")
model.summary()

workdir = tempfile.mkdtemp()
model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
callbacks = [
    keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True),
    keras.callbacks.ModelCheckpoint(os.path.join(workdir, "best.keras"), monitor="val_accuracy", save_best_only=True),
    keras.callbacks.CSVLogger(os.path.join(workdir, "training.csv")),
    keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
]
history = model.fit(x_train, y_train, batch_size=32, epochs=8, validation_data=(x_test, y_test),
                    callbacks=callbacks, verbose=2)

path = os.path.join(workdir, "residual.keras")
model.save(path)
restored = keras.models.load_model(path)
np.testing.assert_allclose(restored.predict(x_test, verbose=0), model.predict(x_test, verbose=0), atol=1e-6)
best = keras.models.load_model(os.path.join(workdir, "best.keras"))
rows = list(csv.DictReader(open(os.path.join(workdir, "training.csv"))))
print("epochs run", len(rows), "best val_accuracy", max(history.history["val_accuracy"]))
assert len(rows) == len(history.history["loss"])
assert max(history.history["val_accuracy"]) > 0.8, history.history
assert best.evaluate(x_test, y_test, verbose=0)[1] == max(history.history["val_accuracy"])
