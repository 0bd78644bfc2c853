"""manualprop: one SGD step of a dense network, cross-verified between NumPy, PyTorch and Keras."""

from .casefile.case import Case, Layer, load_case, parse_case
from .casefile.errors import CaseError
from .engines import Engine, LayerTrace, StepResult

__version__ = "0.1.0"

__all__ = ["Case", "CaseError", "Engine", "Layer", "LayerTrace", "StepResult", "__version__", "load_case", "parse_case"]
