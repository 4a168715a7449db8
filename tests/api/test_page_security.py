"""The page's security headers and script, and a model card that keeps its trainer's paths to
itself: against the real server, and app.js run under node with a stand-in DOM."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from captioner.checkpoint import save_checkpoint
from tests.conftest import talkative_tiny_model

from .helpers import ServerProcess, serve_command

pytestmark = pytest.mark.slow

STATIC = Path(__file__).resolve().parents[2] / "api" / "static"
TRAINER_PATHS = ["/home/alice", "alice", "C:\\", "Users", "/srv", "/mnt"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A model whose card says where it was trained, as `captioner train` writes it."""
    folder = tmp_path_factory.mktemp("model")
    card = {
        "training_data": {
            "root": "/home/alice/data/coco",
            "train_split": "train2014",
            "train_images": 3,
            "skipped_images": {"train": {"count": 1, "images": ["/home/alice/data/coco/bad.jpg"]}},
        },
        "train_config": {
            "data": "/home/alice/data/coco",
            "out": "/srv/runs/coco",
            "karpathy": "C:\\Users\\alice\\k.json",
        },
        "init_from": "/mnt/models/base.safetensors",
        "description": "Trained on /home/alice/data/coco; see https://example.org/a/b.",
        "scores": {"CIDEr": 0.5},
    }
    save_checkpoint(talkative_tiny_model(), folder / "coco.safetensors", card)
    with ServerProcess(serve_command(folder / "coco.safetensors"), folder / "server.log") as server:
        yield server


def test_the_page_sends_its_security_headers(server):
    r = httpx.get(server.base + "/", timeout=30)
    assert r.status_code == 200
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert "unsafe" not in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    for path in ("/static/app.js", "/static/style.css", "/healthz", "/v1/model", "/nothing"):
        r = httpx.get(server.base + path, timeout=30)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer", path


def test_the_page_needs_nothing_its_policy_forbids():
    """No inline script, style or handler; nothing from another origin."""
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert not re.search(r"\sstyle=|\son[a-z]+=", html)
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith(("/static/", "/v1/", "/docs", "/metrics", "data:")), url
    script = (STATIC / "app.js").read_text()
    assert "eval(" not in script and "new Function" not in script and ".style." not in script


def test_the_model_card_shows_no_path_of_the_training_machine(server):
    r = httpx.get(server.base + "/v1/model", timeout=30)
    assert r.status_code == 200
    for path in TRAINER_PATHS:
        assert path not in r.text, path
    card = r.json()
    assert card["training_data"]["root"] == "coco"
    assert card["training_data"]["skipped_images"]["train"]["images"] == ["bad.jpg"]
    assert card["train_config"] == {"data": "coco", "out": "coco", "karpathy": "k.json"}
    assert card["init_from"] == "base.safetensors"
    assert card["description"] == "Trained on coco; see https://example.org/a/b."
    caption = httpx.post(server.base + "/v1/captions", files=[("images", ("a.png", b"x", "image/png"))], timeout=30)
    for path in TRAINER_PATHS:
        assert path not in caption.text


# app.js under node: document, storage and fetch are stand-ins that record what the script does.
HARNESS = r"""
const vm = require("vm"), fs = require("fs");
const calls = [];
function storage(name, initial) {
  const data = { ...initial };
  return {
    getItem: (k) => (k in data ? data[k] : null),
    setItem: (k, v) => { calls.push([name, "set", k, String(v)]); data[k] = String(v); },
    removeItem: (k) => { calls.push([name, "remove", k]); delete data[k]; },
  };
}
function element() {
  const handlers = {};
  const classList = { add() {}, remove() {}, contains() { return false; } };
  const fields = { classList, dataset: { for: "" }, value: "" };
  return new Proxy(fields, {
    get(t, prop) {
      if (prop in t) return t[prop];
      if (prop === "addEventListener") return (type, fn) => (handlers[type] = handlers[type] || []).push(fn);
      if (prop === "dispatchEvent") return (e) => (handlers[e.type] || []).forEach((fn) => fn(e));
      return () => element();
    },
    set(t, prop, v) { t[prop] = v; return true; },
  });
}
const elements = {};
const document = {
  getElementById: (id) => (elements[id] = elements[id] || element()),
  querySelector: () => element(), querySelectorAll: () => [], createElement: () => element(),
};
const fetches = [];
const fetch = async (path, options) => {
  fetches.push([path, options.headers]);
  return { ok: false, status: 401, statusText: "Unauthorized",
           json: async () => ({ error: { code: "unauthorized", message: "send the API key" } }) };
};
const context = { document, fetch, Event: class { constructor(type) { this.type = type; } }, console, URL,
                  performance, localStorage: storage("local", { "captioner.apiKey": "old-secret" }),
                  sessionStorage: storage("session", {}) };
vm.createContext(context);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), context);
const key = elements["api-key"];
key.value = "s3cret";
key.dispatchEvent(new context.Event("change"));
setTimeout(() => console.log(JSON.stringify({ calls, fetches })), 50);
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_keeps_the_key_in_its_tab_never_in_local_storage(tmp_path):
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    r = subprocess.run(["node", str(harness), str(STATIC / "app.js")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    calls = seen["calls"]
    assert ["local", "remove", "captioner.apiKey"] in calls  # what older versions left behind is wiped
    assert not [c for c in calls if c[0] == "local" and c[1] == "set"]
    assert ["session", "set", "captioner.apiKey", "s3cret"] in calls
    assert seen["fetches"][-1] == ["/v1/model", {"X-API-Key": "s3cret"}]  # and it is sent
