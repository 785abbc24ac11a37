"""Run by the train venv's python (`make train-env`), not by pytest: prove that Orchard's exports train.

    .venv-train/bin/python tests/train_check.py convert GGUF OUT_DIR
        dequantize the shipped GGUF into a safetensors checkpoint (a model loaded straight from GGUF is marked
        quantized, and the trainers refuse it)
    .venv-train/bin/python tests/train_check.py train MODEL_DIR EXPORTS_DIR OUT_JSON
        two optimizer steps of TRL's DPOTrainer, KTOTrainer, SFTTrainer and RewardTrainer on the exports
        EXPORTS_DIR/{trl-dpo,trl-kto,sft,trl-rm}, and a token-level check of EXPORTS_DIR/trl-stepwise; writes what
        happened (losses, rows read and rows the trainer kept, versions) as JSON
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path


def convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # the GGUF marker: a plain float32 model of the same weights
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(out_dir)


MAX_LENGTH = 4096  # tokens; SmolLM2 reads 8192
# TRL's configs default to bf16 autocast and gradient checkpointing. On a CPU without bf16 instructions (no AVX512-BF16
# or AMX: this workplace's machines have AVX2) torch's bf16 matrix products fall back to a scalar loop: a step of 8
# short rows took 354 s against ~2 s in float32. A 135M model needs no checkpointing to fit in memory.
CPU_TRAINING = dict(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False)


def train(model_dir: Path, exports: Path, out_json: Path) -> None:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results: dict = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                  "torch": torch.__version__, "datasets": datasets.__version__}}
    scratch = Path(tempfile.mkdtemp(prefix="orchard-train-"))

    def common(name: str, batch: int = 1) -> dict:
        # Two optimizer steps of `batch` rows each, on CPU. max_length is above every row's length, so that a row the
        # trainer leaves out can only be one it could not read.
        return dict(output_dir=str(scratch / name), max_steps=2, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, learning_rate=1e-5, logging_steps=1, save_strategy="no",
                    report_to=[], seed=0, dataloader_num_workers=0, **CPU_TRAINING)

    runs = {
        "DPOTrainer": ("trl-dpo", lambda data: DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer, train_dataset=data,
            args=DPOConfig(**common("dpo"), max_length=MAX_LENGTH))),
        # KTO's KL term needs two rows a batch (TRL refuses one).
        "KTOTrainer": ("trl-kto", lambda data: KTOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer, train_dataset=data,
            args=KTOConfig(**common("kto", batch=2), max_length=MAX_LENGTH))),
        "SFTTrainer": ("sft", lambda data: SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer, train_dataset=data,
            args=SFTConfig(**common("sft"), max_length=MAX_LENGTH))),
        "RewardTrainer": ("trl-rm", lambda data: RewardTrainer(
            model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
            processing_class=tokenizer, train_dataset=data, args=RewardConfig(**common("rm"), max_length=MAX_LENGTH))),
    }
    for trainer_name, (fmt, make) in runs.items():
        # A cache of its own: datasets' shared cache can hand back an earlier export of the same name.
        data = datasets.load_dataset(str(exports / fmt), split="train", cache_dir=str(scratch / "hf-cache"))
        trainer = make(data)
        kept = len(trainer.train_dataset)
        output = trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[trainer_name] = {"format": fmt, "rows": len(data), "rows_kept": kept, "steps": output.global_step,
                                 "loss": output.training_loss, "losses": losses,
                                 "finite": all(math.isfinite(x) for x in [output.training_loss, *losses])}
    results["stepwise"] = stepwise_alignment(tokenizer, datasets.load_dataset(
        str(exports / "trl-stepwise"), split="train", cache_dir=str(scratch / "hf-cache")))
    out_json.write_text(json.dumps(results, indent=2))


def stepwise_alignment(tokenizer, rows) -> dict:
    """Tokenize each stepwise row as a process reward model trainer does (the prompt, then each step followed by a
    separator; a label on the last token of each step, -100 elsewhere) and check that every label lands on its
    step's last token: as many labelled tokens as steps, each closing the text of its step."""
    separator = "\n"
    checked = misaligned = 0
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        ends = []
        for step, label in zip(row["completions"], row["labels"]):
            step_ids = tokenizer(step + separator, add_special_tokens=False)["input_ids"]
            ids += step_ids
            labels += [-100] * (len(step_ids) - 1) + [int(label)]
            ends.append(len(ids) - 1)
        marked = [i for i, label in enumerate(labels) if label != -100]
        checked += 1
        text_ok = all(tokenizer.decode(ids[:end + 1]).endswith(separator) for end in ends)
        if marked != ends or len(marked) != len(row["labels"]) or not text_ok \
                or [labels[i] for i in marked] != [int(x) for x in row["labels"]]:
            misaligned += 1
    return {"rows": len(rows), "checked": checked, "misaligned": misaligned}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "convert":
        convert(Path(args[0]), Path(args[1]))
    elif command == "train":
        train(Path(args[0]), Path(args[1]), Path(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")
