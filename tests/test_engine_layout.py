"""The engine's torch-free modules stay torch-free (the scheduler and the batch must never pull in torch or
Triton; the processors and the core's messages can run where no model is loaded)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = ["allmos.memory.block_manager", "allmos.engine.request", "allmos.engine.batch",
              "allmos.engine.sampling_row", "allmos.engine.scheduler", "allmos.engine.core_types",
              "allmos.engine.input_processor", "allmos.engine.output_processor", "allmos.engine.detokenizer"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_no_torch_or_triton(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
