"""Every trainer-facing export trains: a real embedded run, its exports, and TRL's own trainers on them.

TRL runs in its own venv (`make train-env`; `make train-check` also converts the shipped GGUF to a safetensors
checkpoint once): tests/train_check.py runs there, two optimizer steps of DPOTrainer, KTOTrainer, SFTTrainer and
RewardTrainer, and checks the stepwise export's labels token by token (TRL 1.16 has no process reward trainer).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from orchard import llama_build
from tasks.export import FORMATS, export_dataset

pytestmark = [pytest.mark.integration, pytest.mark.train]

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PYTHON = ROOT / ".venv-train" / "bin" / "python"
TRAINED = {"DPOTrainer": "trl-dpo", "KTOTrainer": "trl-kto", "SFTTrainer": "sft", "RewardTrainer": "trl-rm"}


def test_the_exports_of_a_real_run_train_with_trl(tmp_path, real_run):
    if not TRAIN_PYTHON.exists() or not (llama_build.train_model() / "model.safetensors").is_file():
        pytest.fail("the train venv or the safetensors model is missing: run `make train-check`")
    config, summary = real_run  # every format has rows: see conftest's REAL_SEEDS
    assert summary["status"] == "complete", summary["problems"]

    exports = tmp_path / "exports"
    for fmt in (*TRAINED.values(), "trl-stepwise"):
        export_dataset(config, fmt, exports / fmt, test_share=0.0)
    report = tmp_path / "trained.json"
    done = subprocess.run([str(TRAIN_PYTHON), str(ROOT / "tests" / "train_check.py"), "train",
                           str(llama_build.train_model()), str(exports), str(report)],
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    trained = json.loads(report.read_text())

    assert trained["versions"]["trl"] == "1.16.0"
    for trainer, fmt in TRAINED.items():
        result = trained[trainer]
        assert result["format"] == fmt and result["steps"] == 2, (trainer, result)
        assert result["finite"] and math.isfinite(result["loss"]), (trainer, result)
        # Every exported row is one the trainer could read: none left out as malformed (or too long).
        assert result["rows_kept"] == result["rows"] > 0, (trainer, result)
        assert FORMATS[fmt].checked_with.startswith(f"TRL {trained['versions']['trl']} `{trainer}`")
    stepwise = trained["stepwise"]
    assert stepwise["rows"] == stepwise["checked"] > 0 and stepwise["misaligned"] == 0
