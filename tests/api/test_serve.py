"""`captioner serve`: one flag per setting, flags over environment, a clear message without a model."""

import argparse
import subprocess
import sys

import pytest
import torch

from api import serve
from api.settings import Settings, get_settings
from runtime.home import default_checkpoint


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_setting_but_the_secret_has_a_flag_of_the_same_name():
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    flags = {option: action.dest for action in parser._actions for option in action.option_strings}
    for name in Settings.model_fields:
        if name == "api_key":  # on argv, `ps` would show it: CAPTIONER_API_KEY only
            assert "--api-key" not in flags
        else:
            assert flags["--" + name.replace("_", "-")] == name


def test_flags_override_the_environment_which_overrides_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CAPTIONER_MAX_WAIT_MS", "3")
    monkeypatch.setenv("CAPTIONER_CORS_ORIGINS", "http://a.example, http://b.example")
    settings = serve.settings_from_args(parse("--max-wait-ms", "9", "--checkpoint", str(tmp_path / "m.safetensors")))
    assert settings.max_batch_size == 7
    assert settings.max_wait_ms == 9.0
    assert settings.checkpoint == tmp_path / "m.safetensors"
    assert settings.cors_origins == ["http://a.example", "http://b.example"]
    assert settings.port == 8000 and settings.host == "127.0.0.1"


def test_the_default_checkpoint_is_the_demo_model(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert get_settings().checkpoint == default_checkpoint() == tmp_path / "demo" / "model.safetensors"
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


def test_an_invalid_flag_value_exits_2_naming_the_flag(capsys):
    assert serve.main(parse("--max-batch-size", "0")) == 2
    assert "--max-batch-size" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_this_machine_lacks_exits_2_before_the_server_starts(capsys):
    assert serve.main(parse("--device", "cuda")) == 2
    assert "--device: device cuda: no CUDA GPU is available here" in capsys.readouterr().err


def test_amp_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CAPTIONER_AMP", "true")
    assert Settings().amp and not Settings(amp="false").amp


def test_a_missing_model_exits_2_saying_what_to_run(capsys, tmp_path):
    assert serve.main(parse("--checkpoint", str(tmp_path / "missing.safetensors"))) == 2
    err = capsys.readouterr().err
    assert "captioner demo --no-serve" in err and "--checkpoint" in err and "missing.safetensors" in err


def test_the_console_command_reaches_serve(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--checkpoint", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "captioner demo --no-serve" in r.stderr


@pytest.mark.parametrize("module", ["api.app", "api.serve"])
def test_the_api_imports_neither_training_code_nor_pycocotools(module):
    code = (
        f"import sys, {module}; bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'pycocotools')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
