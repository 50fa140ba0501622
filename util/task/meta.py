"""What a finetuned checkpoint says about its model and task: one typed record, stored as the plain dict 'meta'.

`RunMeta` is built in one place, `models_build` (from a finetuning run, or from the weights of a checkpoint that
has no metadata), and read back with `RunMeta.from_dict`, which fills what older checkpoints lack. Readers never
patch it: a value that is not in the record (the encoder's width, say) is asked of the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from util.errors import UserError
from util.task.tasks import Task, task_named
from util.triple import to_3tuple

DEFAULTS = dict(global_pool="avg", feature_size=16, linprobe=False, in_chans=1, label_columns=())


@dataclass(frozen=True)
class RunMeta:
    """The model and task of a finetuned (or headless) checkpoint.

    task: the Task (stored as 'mode', its name, plus 'task', the --task family, for older readers); model: the
    ViT factory name (vit_<size>_patch16); nb_classes: classes (binary: 2; multi-label, regression: the label
    columns; segmentation: label values; embedding: 0); nb_outputs: the head's width; label_names: one per class
    or label column; label_columns: the input table's label columns; global_pool: avg, token or cat; feature_size:
    the UNETR decoder width; linprobe: the head is BatchNorm + Linear."""
    task: Task
    model: str
    input_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    nb_classes: int
    nb_outputs: int
    label_names: tuple[str, ...] = ()
    label_columns: tuple[str, ...] = ()
    global_pool: str = "avg"
    feature_size: int = 16
    linprobe: bool = False
    in_chans: int = 1
    extra: dict = field(default_factory=dict, compare=False)  # keys of a newer version, kept when rewritten

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "input_size", to_3tuple(self.input_size, "meta input_size"))
        set_(self, "patch_size", to_3tuple(self.patch_size, "meta patch_size"))
        set_(self, "label_names", tuple(str(n) for n in self.label_names))
        set_(self, "label_columns", tuple(str(n) for n in self.label_columns))
        set_(self, "nb_classes", int(self.nb_classes))
        set_(self, "nb_outputs", int(self.nb_outputs))

    @property
    def output_columns(self) -> list[str]:
        """The names of the probability / value columns, one per output column (see Task.output_columns)."""
        return self.task.output_columns(self.label_names, self.nb_outputs, self.nb_classes)

    def to_dict(self) -> dict:
        """Plain data for the checkpoint (loads with weights_only=True): the fields, 'mode' = the task's name."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("task", "extra")}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        return {**self.extra, **out, "mode": self.task.name, "task": self.task.family}

    @classmethod
    def from_dict(cls, d: dict, source: str = "the checkpoint") -> "RunMeta":
        """The record of a stored 'meta' dict; fills what older checkpoints of this repository lack (pooling,
        decoder width, linear probe, channels, label columns, patch size, class count and names). One sentence when a required key is missing."""
        d = dict(d)
        missing = [k for k in ("mode", "model", "input_size", "nb_outputs") if k not in d]
        if missing:
            raise UserError(f"{source}: its 'meta' lacks {', '.join(missing)}; it was not written by main_finetune.py.")
        known = {f.name for f in fields(cls)} - {"task", "extra"}
        kw = {**DEFAULTS, **{k: v for k, v in d.items() if k in known}}
        task = task_named(str(d["mode"]))
        kw.setdefault("patch_size", (16, 16, 16))
        kw.setdefault("nb_classes", task.classes_of_head(int(d["nb_outputs"])))
        kw.setdefault("label_names", [str(c) for c in range(int(kw["nb_classes"]))])
        extra = {k: v for k, v in d.items() if k not in known and k not in ("mode", "task")}
        return cls(task=task, extra=extra, **kw)

