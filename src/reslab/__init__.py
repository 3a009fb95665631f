"""reslab: residual networks on PyTorch, faithful to the papers and fast on a CPU."""

from reslab.errors import ReslabError
from reslab.export import load
from reslab.models import list_models
from reslab.weights import create_model

__version__ = "0.1.0"
__all__ = ["ReslabError", "create_model", "list_models", "load", "__version__"]
