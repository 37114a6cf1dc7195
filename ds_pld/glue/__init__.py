"""GLUE fine-tuning of the pretrained encoder (optionally with EarlyBERT's fine-tuning mode) and its summary."""
from ds_pld.glue.config import GlueConfig, TaskSettings, parse_glue_config
from ds_pld.glue.metrics import compute_metrics, glue_average, task_score
from ds_pld.glue.model import SequenceClassifier
from ds_pld.glue.tasks import GLUE_TASKS, GlueTask, get_task, parse_tasks

__all__ = ["GLUE_TASKS", "GlueConfig", "GlueTask", "SequenceClassifier", "TaskSettings", "compute_metrics",
           "get_task", "glue_average", "parse_glue_config", "parse_tasks", "task_score"]
