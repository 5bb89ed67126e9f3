"""dearkd_fast: fast, faithful DearKD (Chen et al., CVPR 2022) for PyTorch.

Importing the package registers the student (`dearkd_*`) and CIFAR teacher (`cifar_resnet*`)
models with timm.
"""
from . import ops, reference
from .config import InvertConfig, TrainConfig
from .errors import DearKDError, InputError, RunError
from .losses import DearKDLoss, DeepInversionHook
from .models import student as _student  # noqa: F401  (timm registration)
from .models import teacher as _teacher  # noqa: F401  (timm registration)
from .models.student import DearKDViT
from .models.teacher import Teacher, load_teacher

__version__ = "0.1.0"
__all__ = ["DearKDError", "InputError", "RunError", "TrainConfig", "InvertConfig", "DearKDLoss", "DeepInversionHook",
           "DearKDViT", "Teacher", "load_teacher", "ops", "reference", "__version__"]
