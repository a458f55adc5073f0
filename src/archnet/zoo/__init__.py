"""Small teachers for the demo and the tests, created by name like timm models."""

from archnet.zoo import tiny_effnet as _tiny_effnet  # noqa: F401  (registers the model)
from archnet.zoo import tiny_resnet as _tiny_resnet  # noqa: F401  (registers the model)
from archnet.zoo import tiny_vit as _tiny_vit  # noqa: F401  (registers the model)
from archnet.zoo.demo import demo_data, demo_teacher
from archnet.zoo.registry import create_model, is_model, list_models, register_model
from archnet.zoo.train import evaluate, train_classifier

__all__ = [
    "create_model",
    "demo_data",
    "demo_teacher",
    "evaluate",
    "is_model",
    "list_models",
    "register_model",
    "train_classifier",
]
