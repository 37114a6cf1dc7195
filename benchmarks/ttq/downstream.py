"""Downstream check: every final model of the data-rich regime is fine-tuned on a real classification task built
offline from real text (the part of speech of a WordNet headword from the gloss of its first sense, split by
headword; ds_pld/glue/wordnet_pos.py), through the GLUE harness, as a custom TSV task. References: the majority
class and a bag-of-words logistic regression (scikit-learn) on the same split."""
from __future__ import annotations

from pathlib import Path
from typing import Any

TASK = "wordpos"
FINETUNE = {"learning_rate": 2e-4, "epochs": 3, "batch_size": 32, "warmup_ratio": 0.1, "eval_batch_size": 128,
            "weight_decay": 0.01, "classifier_dropout": 0.1}  # one setting for every model; small models like 1e-4+


def build_task(wordnet: str, out: Path, per_class: tuple[int, int]) -> Path:
    """The task folder `<out>/downstream_task/wordpos` (built once) and its references next to it."""
    from ds_pld.glue.wordnet_pos import bag_of_words_reference, build_wordnet_pos

    from .store import read_json, write_atomic

    root = out / "downstream_task"
    reference = root / "reference.json"
    if read_json(reference) is None:
        build_wordnet_pos(wordnet, root, train_per_class=per_class[0], dev_per_class=per_class[1])
        write_atomic(reference, bag_of_words_reference(root / TASK))
    return root


def finetune(final_dir: str, task_root: Path, work: Path, seq: int, seed: int, max_steps: int | None) -> dict[str, Any]:
    """Fine-tune one pretrained model (one fine-tuning seed); returns the dev accuracy and the step count."""
    from ds_pld.glue.job import run_glue

    config = {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-6}},
              "gradient_clipping": 1.0, "steps_per_print": 10**9,
              "glue": {**FINETUNE, "max_seq_length": seq, "seeds": [seed]}}
    summary = run_glue(final_dir, TASK, work, config, glue_dir=task_root, max_steps=max_steps)
    entry = summary["entries"][TASK]
    run = summary["runs"][0]
    return {"accuracy": entry["aggregated"]["accuracy"], "steps": run.get("steps"), "settings": FINETUNE}
