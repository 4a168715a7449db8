"""Where the default model lives, so the demo, the server and the folder CLI agree."""

import os
from pathlib import Path


def captioner_home() -> Path:
    """$CAPTIONER_HOME, else $XDG_CACHE_HOME/captioner, else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_HOME"):
        return Path(os.environ["CAPTIONER_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "captioner"


def default_workdir() -> Path:
    """What `captioner demo` builds: the Shapes data, the feature cache, runs and the model."""
    return captioner_home() / "demo"


def default_checkpoint() -> Path:
    """The default model that `captioner demo` trains and everything else serves."""
    return default_workdir() / "model.safetensors"
