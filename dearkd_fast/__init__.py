"""dearkd_fast: fast, faithful DearKD (Chen et al., CVPR 2022) for PyTorch.

Importing the package registers the student (`dearkd_*`) and CIFAR teacher (`cifar_resnet*`)
models with timm.
"""
from . import ops, reference
from .config import InvertConfig, TrainConfig
from .errors import DearKDError, InputError, RunError
from .losses import DearKDLoss, DeepInversionHook, DeepInversionLoss, SupervisedLoss
from .models import student as _student  # noqa: F401  (timm registration)
from .models import teacher as _teacher  # noqa: F401  (timm registration)
from .models.student import DearKDViT, DistilledOutput, load_student, save_student
from .models.teacher import Teacher, TeacherSpec, create_classifier, load_teacher, save_teacher
from .task import DearKDTask

__version__ = "0.1.0"
__all__ = ["DearKDError", "InputError", "RunError", "TrainConfig", "InvertConfig", "DearKDLoss", "DearKDTask",
           "DeepInversionHook", "DeepInversionLoss", "SupervisedLoss", "DearKDViT", "DistilledOutput", "Teacher",
           "TeacherSpec", "create_classifier", "load_teacher", "save_teacher", "load_student", "save_student", "ops",
           "reference", "__version__"]
