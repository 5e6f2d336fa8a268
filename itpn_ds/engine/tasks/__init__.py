"""The tasks the engine trains and evaluates, one module each, registered by name.

Each task module holds everything the task is: its config section (a dataclass; ``config.RunConfig`` composes
them under the task's name), its family of hooks (a :class:`~itpn_ds.engine.tasks.base.TaskFamily` registered
with ``@register_task(name)``: checks, model preparation, loaders, loss, evaluator, best metric), its
per-micro-batch loss and its evaluation:

* ``pretrain`` (:mod:`.pretrain`): CLIP distillation or pixel reconstruction; no evaluation;
* ``finetune`` (:mod:`.classify`): classification, top-1 / top-5;
* ``segment`` (:mod:`.segment`): UperNet semantic segmentation, mIoU;
* ``detect`` (:mod:`.detect`): Mask R-CNN detection and instance segmentation, COCO box / mask AP.

The engine (``commands``, ``trainer``) knows a task only through ``task_family(cfg)`` and the hooks of
:class:`~itpn_ds.engine.tasks.base.TaskFamily`. Adding a task: a module here with its config dataclass, its
family registered under its name and imported below, and a field of that name in ``RunConfig``
(docs/engine.md, "Adding a task").

Nothing imported here may import ``itpn_ds.config`` when it is loaded (``config`` imports the sections from
here): the modules name ``RunConfig`` for their type hints only (``TYPE_CHECKING``).
"""
# each module registers its task; this order is the tasks' order (``task_names()``, messages)
from itpn_ds.engine.tasks import pretrain, classify, segment, detect  # noqa: F401,I001
from itpn_ds.engine.tasks.base import FAMILIES, TaskFamily, evaluated_as, register_task, task_family, task_names

__all__ = ["FAMILIES", "TaskFamily", "evaluated_as", "register_task", "task_family", "task_names"]
