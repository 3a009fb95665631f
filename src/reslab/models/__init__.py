from reslab.models.blocks import (
    BLOCKS,
    BasicBlock,
    Bottleneck,
    PlainBasicBlock,
    PlainBottleneck,
    PreActBasicBlock,
    PreActBottleneck,
)
from reslab.models.resnet import (
    CIFAR_DEPTHS,
    IMAGENET_DEPTHS,
    ResNet,
    create_model,
    list_models,
    model_defaults,
)

__all__ = [
    "BLOCKS",
    "BasicBlock",
    "Bottleneck",
    "CIFAR_DEPTHS",
    "IMAGENET_DEPTHS",
    "PlainBasicBlock",
    "PlainBottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "create_model",
    "list_models",
    "model_defaults",
]
