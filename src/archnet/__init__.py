"""archnet: turn a trained PyTorch network into a fast, hardware-aware student.

HANT/LANA (candidate operations per block, measured latency, integer linear program) and
Arch-Net (restricted operator sets, progressive blockwise distillation), label-free.
"""

from archnet.api import ConversionResult, convert, resume
from archnet.blocks import BlockSpec, find_blocks
from archnet.config import ConvertConfig
from archnet.errors import ArchnetError
from archnet.targets import Target, list_targets, load_target

__all__ = [
    "ArchnetError",
    "BlockSpec",
    "ConversionResult",
    "ConvertConfig",
    "Target",
    "convert",
    "find_blocks",
    "list_targets",
    "load_target",
    "resume",
]
__version__ = "0.1.0"
