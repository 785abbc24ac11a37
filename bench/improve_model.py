"""The model side of bench/improve.py, run by the train venv's python (`make train-env`), never by Orchard's.

    .venv-train/bin/python bench/improve_model.py train {dpo,sft} MODEL_DIR EXPORT_DIR OUT_DIR OUT_JSON [options]
        train a copy of MODEL_DIR with TRL's DPOTrainer on a `trl-dpo` export (or SFTTrainer on an `sft` export),
        every row of its train split; save the model to OUT_DIR and what happened (rows, steps, losses, wall) to
        OUT_JSON
    .venv-train/bin/python bench/improve_model.py gguf MODEL_DIR TEMPLATE_GGUF OUT_GGUF [--check]
        write MODEL_DIR (a float32 llama checkpoint) as an F32 GGUF for llama-server, with TEMPLATE_GGUF's metadata
        (architecture, tokenizer, chat template): the shipped SmolLM2 file the checkpoint was made from. --check
        compares every tensor with TEMPLATE_GGUF's dequantized weights (the base checkpoint must round-trip exactly)

The trainers are built as tests/train_check.py builds them (that file proves every export trains); here they run
for whole epochs with the hyperparameters bench/improve.py passes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.train_check import CPU_TRAINING, MAX_LENGTH  # noqa: E402 - the repository root first


def train(method: str, model_dir: Path, export_dir: Path, out_dir: Path, out_json: Path, *, epochs: float,
          learning_rate: float, beta: float, batch: int, accumulation: int, max_steps: int, seed: int) -> None:
    """Train `model_dir` on the export's train split with DPO or SFT; save the model and a JSON record."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    started = time.monotonic()
    torch.manual_seed(seed)
    scratch = Path(tempfile.mkdtemp(prefix="orchard-improve-"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # A cache of its own: datasets' shared cache can hand back an earlier export of the same name.
    rows = datasets.load_dataset(str(export_dir), split="train", cache_dir=str(scratch / "hf-cache"))
    common = dict(output_dir=str(scratch / method), num_train_epochs=epochs, max_steps=max_steps,
                  per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                  learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=0.1, logging_steps=1,
                  save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0, max_length=MAX_LENGTH,
                  **CPU_TRAINING)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "dpo":
        trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=rows,
                             args=DPOConfig(**common, beta=beta))
    else:
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=rows, args=SFTConfig(**common))
    kept = len(trainer.train_dataset)
    output = trainer.train()
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "method": method, "rows": len(rows), "rows_kept": kept, "steps": output.global_step,
        "epochs": epochs, "learning_rate": learning_rate, "beta": beta if method == "dpo" else None,
        "batch": batch * accumulation, "loss": output.training_loss,
        "first_losses": [e["loss"] for e in log[:3]], "last_losses": [e["loss"] for e in log[-3:]],
        "finite": all(math.isfinite(e["loss"]) for e in log),
        # DPO's own view of the pairs: how often the policy ranks chosen above rejected, late in training
        "last_reward_accuracy": next((e.get("rewards/accuracies") for e in reversed(log)
                                      if "rewards/accuracies" in e), None),
        "wall_s": round(time.monotonic() - started, 1), "trl": trl.__version__,
    }
    out_json.write_text(json.dumps(record, indent=2))


def _permute(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's order of a q/k projection's rows (convert_hf_to_gguf.py's LlamaModel.permute): the inverse of what
    transformers undoes when it loads a llama GGUF (modeling_gguf_pytorch_utils._reverse_permute_weights)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def to_gguf(model_dir: Path, template: Path, out: Path, *, check: bool) -> dict:
    """Write the checkpoint in `model_dir` as an F32 GGUF with `template`'s metadata; return what was written."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise SystemExit(f"{model_dir}: a llama checkpoint is expected, got model_type {config.get('model_type')!r}")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, np.ndarray] = {}
    for part in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(part)))
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)  # the GGUF has no output tensor: llama.cpp ties it to token_embd
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SystemExit(f"{model_dir}: tensor {name} has no GGUF name")
        value = value.astype(np.float32)
        if name.endswith("q_proj.weight"):
            value = _permute(value, heads, heads)
        elif name.endswith("k_proj.weight"):
            value = _permute(value, heads, kv_heads)
        tensors[target] = value

    reader = gguf.GGUFReader(str(template))
    expected = {t.name for t in reader.tensors}
    if set(tensors) != expected:
        raise SystemExit(f"{model_dir}: tensors differ from {template.name}'s: missing {sorted(expected - set(tensors))[:5]}, "
                         f"extra {sorted(set(tensors) - expected)[:5]}")
    result: dict = {"tensors": len(tensors), "out": str(out)}
    if check:
        worst = 0.0
        for tensor in reader.tensors:
            reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tensors[tensor.name].shape)
            worst = max(worst, float(np.max(np.abs(reference - tensors[tensor.name]))))
        result["max_abs_diff_to_template"] = worst

    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = gguf.LlamaFileType.ALL_F32 if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:  # the template's order
        writer.add_tensor(tensor.name, tensors[tensor.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("train")
    fit.add_argument("method", choices=("dpo", "sft"))
    for name in ("model_dir", "export_dir", "out_dir", "out_json"):
        fit.add_argument(name, type=Path)
    fit.add_argument("--epochs", type=float, default=2.0)
    fit.add_argument("--lr", type=float, default=5e-6)
    fit.add_argument("--beta", type=float, default=0.1)
    fit.add_argument("--batch", type=int, default=2)
    fit.add_argument("--accumulation", type=int, default=4)
    fit.add_argument("--max-steps", type=int, default=-1)
    fit.add_argument("--seed", type=int, default=0)
    convert = sub.add_parser("gguf")
    for name in ("model_dir", "template", "out"):
        convert.add_argument(name, type=Path)
    convert.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.command == "train":
        train(args.method, args.model_dir, args.export_dir, args.out_dir, args.out_json, epochs=args.epochs,
              learning_rate=args.lr, beta=args.beta, batch=args.batch, accumulation=args.accumulation,
              max_steps=args.max_steps, seed=args.seed)
    else:
        print(json.dumps(to_gguf(args.model_dir, args.template, args.out, check=args.check)))


if __name__ == "__main__":
    main()
