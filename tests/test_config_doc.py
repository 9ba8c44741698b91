"""launch.py --help lists every config field with its value and its config file's comment."""

import subprocess
import sys

from conftest import REPO

from alexnet_jax import config_doc


def test_every_field_with_the_comment_of_the_file_that_sets_it():
    from configs import alexnet, digits

    base = config_doc.all_comments(REPO / "configs/alexnet.py")
    assert base["optimizer.momentum"] == ""  # set without a comment
    assert base["input.pca_lighting_std"] == "std of the PCA colour shift (section 4.1); 0: off"
    assert base["input.mean"].startswith("'image': subtract the training set's mean image")
    text = config_doc.describe(digits.get_config(), REPO / "configs/digits.py")
    lines = {line.split("=")[0].strip(): line for line in text.splitlines()}
    assert len(lines) == len(config_doc._leaves(alexnet.get_config()))  # every field
    # The variant's own comment where it sets the field, the base's where it does not,
    # none where it sets the field without one.
    assert "a mirrored digit is another symbol" in lines["--config.input.random_flip"]
    assert "the paper's two GPU towers" in lines["--config.model.towers"]
    assert lines["--config.eval_every_steps"].split() == ["--config.eval_every_steps=125"]
    assert "--config.model.width=0.5 " in lines["--config.model.width"]


def test_launch_help_lists_the_config_fields():
    r = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), f"--config={REPO / 'configs/owt.py'}", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # The launch flags first, then the config's fields.
    assert r.stdout.index("--workdir:") < r.stdout.index("Config fields of")
    assert "--config.model.variant='owt'" in r.stdout
    assert "no grouped convolutions" in r.stdout  # owt.py's comment on model.towers
