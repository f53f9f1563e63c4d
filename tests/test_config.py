"""config.json: validation names the bad field, saving keeps what it does not know, first run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from gateway.config import ConfigError, load_config, parse_config, save_config
from gateway.default_model import DEFAULT_NAME, ensure_config
from supervisor.spec import SlotConfig, SlotDefaults, llama_server_args, machine_threads

from .conftest import ROOT

EXAMPLE = ROOT / "data" / "config.example.json"


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert config.upstreams[0].name == "ollama"
    assert config.performance.kv_cache_quantization == "q8_0"


@pytest.mark.parametrize("raw,field", [
    ({"slots": {"4801": {"model_path": "m.gguf", "model_type": "painting"}}}, "slots.4801.model_type"),
    ({"slots": {"4801": {"model_type": "text"}}}, "slots.4801.model_path"),
    ({"slots": {"9999": None}}, "slots.9999"),
    ({"slots": {"4801": {"model_path": "m.gguf", "ctx_size": -1}}}, "slots.4801.ctx_size"),
    ({"upstreams": [{"name": "x", "url": "ftp://nope"}]}, "upstreams[0].url"),
    ({"upstreams": [{"name": "x", "url": "http://a/v1"}, {"name": "x", "url": "http://b/v1"}]}, "upstreams[1].name"),
    ({"default_threads": "four"}, "default_threads"),
    ({"performance": {"kv_cache_quantization": "q3_z"}}, "performance.kv_cache_quantization"),
    ({"performance": {"flash_attention": "sometimes"}}, "performance.flash_attention"),
    ({"performance": {"mlock": 1}}, "performance.mlock"),
    ({"rate_limits": {"payg": -5}}, "rate_limits.payg"),
])
def test_invalid_config_names_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "slots": {,\n}')
    with pytest.raises(ConfigError, match="line 2"):
        load_config(path)


def test_invalid_config_stops_startup_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"default_ctx_size": 0}))
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--data-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "default_ctx_size" in result.stderr


def test_save_round_trips_and_keeps_unknown_keys(tmp_path: Path) -> None:
    raw = json.loads(EXAMPLE.read_text())
    raw["future_setting"] = {"keep": True}
    config = parse_config(raw)
    config.slots[4803] = SlotConfig("models/x.gguf", "embedding", name="x")
    path = tmp_path / "config.json"
    save_config(config, path)
    saved = json.loads(path.read_text())
    assert saved["future_setting"] == {"keep": True}
    assert saved["slots"]["4803"] == {"model_path": "models/x.gguf", "model_type": "embedding", "name": "x"}
    assert parse_config(saved).to_dict() == saved
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_admin_key_env_overrides_without_being_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"admin_key": "from-file"})
    monkeypatch.setenv("LLM_GATEWAY_ADMIN_KEY", "from-env")
    assert config.effective_admin_key == "from-env"
    save_config(config, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["admin_key"] == "from-file"


def test_llama_server_flags_follow_type_and_performance() -> None:
    perf = parse_config({"performance": {"flash_attention": False, "mlock": True, "kv_cache_quantization": "q8_0",
                                         "batch_size": 256, "parallel": 2}}).performance
    defaults = SlotDefaults(threads=3, ctx_size=4096, performance=perf, base_dir=Path("/data"))
    args = llama_server_args(4802, SlotConfig("models/e.gguf", "embedding", ctx_size=1024), defaults)
    joined = " ".join(args)
    assert "--model /data/models/e.gguf" in joined and "--port 4802" in joined
    assert "--threads 3" in joined and "--ctx-size 1024" in joined and "--batch-size 256" in joined
    assert "--embeddings --pooling mean" in joined and "--flash-attn off" in joined
    assert "--cache-type-k q8_0" in joined and "--cache-type-v" not in joined  # V needs flash attention
    assert "--parallel 2" in joined and "--load-mode mmap+mlock" in joined
    vision = llama_server_args(4803, SlotConfig("/m/v.gguf", "vision", mmproj="/m/p.gguf"), SlotDefaults())
    assert "--mmproj /m/p.gguf" in " ".join(vision) and "--embeddings" not in vision


def test_threads_default_to_the_physical_cores_this_process_may_use() -> None:
    config = parse_config({"default_threads": None})
    args = llama_server_args(4801, SlotConfig("/m/t.gguf", "text"), config.slot_defaults(Path("/data")))
    threads = int(args[args.index("--threads") + 1])
    assert threads == machine_threads() and 1 <= threads <= len(os.sched_getaffinity(0))
    assert threads <= (psutil.cpu_count(logical=False) or threads)
    assert parse_config({}).to_dict()["default_threads"] is None  # saved as "auto", not as this machine's count
    pinned = llama_server_args(4801, SlotConfig("/m/t.gguf", "text"), parse_config({"default_threads": 3})
                               .slot_defaults(Path("/data")))
    assert pinned[pinned.index("--threads") + 1] == "3"


def test_first_run_writes_a_config_with_the_default_model(tmp_path: Path) -> None:
    path = ensure_config(tmp_path)
    config = load_config(path)
    slot = config.slots[4801]
    assert slot is not None and slot.name == DEFAULT_NAME and slot.model_type == "text"
    assert (tmp_path / slot.model_path).stat().st_size > 200_000_000
    assert config.admin_key and len(config.admin_key) > 32
    assert all(config.slots[p] is None for p in range(4802, 4808))


def test_existing_config_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"slots": {}}))
    before = path.read_bytes()
    assert ensure_config(tmp_path) == path
    assert path.read_bytes() == before
    assert not (tmp_path / "models").exists()
    assert all(slot is None for slot in load_config(path).slots.values())
