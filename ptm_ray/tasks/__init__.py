"""Tasks: what a model is fine-tuned to predict, and everything that depends on it (``ptm_ray.tasks.base``).

==================== ==================================== ================= ==========================
task                 families                             target            default ``train.metric``
==================== ==================================== ================= ==========================
classification       every family with a classifier head  a class label     val_accuracy (max)
multilabel           every family with a classifier head  a set of labels   val_micro_f1 (max)
detection            torchvision Faster R-CNN, YOLO       boxes + classes   val_map (max)
speech_recognition   wav2vec 2.0, HuBERT, DeepSpeech      a transcript      val_wer (min)
text2text            T5                                   a target text     val_chrf (max)
text_generation      GPT-2                                the text itself   val_perplexity (min)
==================== ==================================== ================= ==========================

Which families a task accepts follows from the head it trains and the capabilities it needs; no family
lists task names. A new task is one module (a ``Task`` subclass decorated with ``@register_task``) and one
import line below.
"""

from ptm_ray.tasks.base import Task, WorkerContext
from ptm_ray.tasks.registry import register_task, task_for, task_names

# The built-in tasks, one line each: importing a task module registers its task.
import ptm_ray.tasks.classification  # noqa: E402,F401
import ptm_ray.tasks.detection  # noqa: E402,F401
import ptm_ray.tasks.generation  # noqa: E402,F401
import ptm_ray.tasks.multilabel  # noqa: E402,F401
import ptm_ray.tasks.speech  # noqa: E402,F401

__all__ = ["Task", "WorkerContext", "register_task", "task_for", "task_names", "tasks_for_family"]


def tasks_for_family(family) -> list[str]:
    """The tasks ``family`` (a ``ptm_ray.models.base.Family``) can be fine-tuned for."""
    return [name for name in task_names() if task_for(name).unsupported_by(family) is None]
