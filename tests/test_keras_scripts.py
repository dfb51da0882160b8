"""Three complete scripts in Keras's idiom (tests/keras_scripts/), each of which would run under
Keras 3 with its first line reading `import keras`: here that line is the only one that differs.
Each trains on a few thousand MNIST images and asserts an accuracy a working framework reaches."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = os.path.join(ROOT, "tests", "keras_scripts")
NAMES = ["mnist_convnet.py", "logits_sequential.py", "residual_callbacks.py"]
IMPORT_LINE = "import tinycnn as keras  # under Keras 3 this line reads: import keras"


@pytest.mark.parametrize("name", NAMES)
def test_keras_script_runs_with_only_the_import_line_changed(name, tmp_path):
    source = open(os.path.join(SCRIPTS, name)).read()
    lines = source.splitlines()
    assert lines[0] == IMPORT_LINE
    assert not any("tinycnn" in line for line in lines[1:]), "only the first line may name tinycnn"
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, name)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
