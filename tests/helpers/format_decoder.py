"""Decode a checkpoint the way docs/FORMAT.md says, in a fresh process that never imports gpuguard.

The decoder is the Python code block of docs/FORMAT.md itself ("A minimal decoder"), executed as it is
written there, so the document cannot drift from what gpuguard writes. The process flattens what it
decoded into a safetensors file of tensors (by path) and a JSON description of everything else, which
`describe` builds the same way from a live state in the test for comparison.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def decoder_source() -> str:
    text = DOC.read_text()
    after = text.split("A minimal decoder", 1)[1]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match, "docs/FORMAT.md: no Python block after 'A minimal decoder'"
    return match.group(1)


def describe(value: Any, path: str, tensors: dict[str, Any]) -> Any:
    """A JSON-able description of a decoded state; its tensors go into ``tensors`` by path."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().clone().contiguous()
        return {"tensor": path}
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        tensors[path] = torch.from_numpy(value.copy())
        return {"ndarray": path}
    if isinstance(value, dict):
        return {"dict": [[k, describe(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [describe(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    return value


_DRIVER = """
import json, sys
import torch
from safetensors.torch import save_file
{decoder}
sys.path.insert(0, {helpers!r})
from format_decoder import describe
state = read_checkpoint(sys.argv[1], int(sys.argv[2]))
assert not [m for m in sys.modules if m == "gpuguard" or m.startswith("gpuguard.")], "gpuguard was imported"
tensors = {{}}
shape = {{key: describe(value, key, tensors) for key, value in state.items()}}
save_file(tensors, sys.argv[3] + ".safetensors")
json.dump(shape, open(sys.argv[3] + ".json", "w"))
print("decoded", len(tensors))
"""


def decode_elsewhere(folder: Path, out: Path, rank: int = 0) -> tuple[Any, dict[str, Any]]:
    """Decode ``folder`` (one checkpoint) in a fresh process without gpuguard; (description, tensors)."""
    from safetensors.torch import load_file

    script = _DRIVER.format(decoder=decoder_source(), helpers=str(Path(__file__).parent))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(rank), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(out.parent),  # not the repository: "import gpuguard" would fail there unless installed
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("decoded"), done.stderr[-3000:]
    return json.loads(Path(f"{out}.json").read_text()), load_file(f"{out}.safetensors")
