"""A version's adapter merged into the base weights: the folder the live version is served from.

Runtime LoRA costs the engine half its throughput or more (two extra matrix products per layer
per token, in kernels slower than the base model's), and every client of the live version pays
it on every token. A merged copy is the base model with `W + BA·s` in place of `W`: same
architecture, same speed as the base. It is derived data — rebuilt from the immutable version
folder and the base model whenever it is missing or does not match — so it lives in the
server's data dir, not in the version folder, and only for versions an alias serves.

`python -m serving.engine.merge BASE ADAPTER OUT VERSION ADAPTER_FILES_JSON` does the merge in a
process of its own (torch and peft load there, not in the gateway, and a cancelled merge is a
killed process). The folder is written under a temporary name and renamed when complete,
with `merged.json`: the version, the adapter's manifest hashes it was made from, and a sha256
per file, checked before an engine is started on it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from serving.version_folder import file_digest

RECORD = "merged.json"
# Files of an HF model folder the engine needs beside the weights and config.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def merged_is_complete(out: Path, version: str, adapter_files: dict[str, str]) -> bool:
    """`out` holds a merge of this version's adapter files, unaltered since it was written."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if record.get("version") != version or record.get("adapter_files") != adapter_files:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, digest in files.items():
        file = out / name
        if "/" in name or not file.is_file() or file_digest(file) != digest:
            return False
    return True


def merge(base_dir: Path, adapter_dir: Path, out: Path, version: str,
          adapter_files: dict[str, str]) -> None:
    """Write `out`: the base model with the adapter folded in, in the base's own dtype."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, tmp / name)
    record: dict[str, Any] = {
        "version": version, "adapter_files": adapter_files, "base_model": str(base_dir),
        "files": {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prune(work_dir: Path, keep: set[str]) -> list[str]:
    """Remove the merged folders (and leftover partial ones) of versions not in `keep`: each is
    a full copy of the base weights, and a version no alias serves needs none (merged again if
    it is promoted once more). Folders without a merge record are not ours and are left."""
    removed = []
    for folder in sorted(work_dir.iterdir()) if work_dir.is_dir() else ():
        partial = folder.name.startswith(".") and folder.name.endswith(".partial")
        version = folder.name[1:-len(".partial")] if partial else folder.name
        ours = partial or (folder / RECORD).is_file()
        if folder.is_dir() and ours and version not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: python -m serving.engine.merge BASE_DIR ADAPTER_DIR OUT_DIR VERSION "
              "ADAPTER_FILES_JSON", file=sys.stderr)
        return 2
    base, adapter, out, version, files = argv
    merge(Path(base), Path(adapter), Path(out), version, json.loads(files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
