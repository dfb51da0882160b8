import tinycnn as keras  # under Keras 3 this line reads: import keras
"""A Sequential() built with add(), ending in logits, trained with
SparseCategoricalCrossentropy(from_logits=True) on integer labels (Keras's beginner quickstart idiom)."""
import numpy as np

(x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
x_train, x_test = x_train[:3000] / 255.0, x_test[:1000] / 255.0
y_train, y_test = y_train[:3000], y_test[:1000]

keras.utils.set_random_seed(2)
model = keras.Sequential()
model.add(keras.layers.Flatten(input_shape=(28, 28)))
model.add(keras.layers.Dense(128, activation="relu"))
model.add(keras.layers.Dropout(0.2))
model.add(keras.layers.Dense(10))

loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(optimizer="adam", loss=loss_fn, metrics=["accuracy"])
model.fit(x_train, y_train, epochs=5, verbose=2)
loss, accuracy = model.evaluate(x_test, y_test, verbose=2)

logits = model.predict(x_test, verbose=0)
probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
probabilities /= probabilities.sum(axis=1, keepdims=True)
print("test accuracy", accuracy, "first prediction", probabilities[0].round(3))
assert accuracy > 0.85, accuracy
assert (probabilities.argmax(axis=1) == y_test).mean() == accuracy
