"""Methods by name (``method.name``): one module each, registered in ``METHODS`` when imported here.

Adding a method is one new module (its config section, selector and, where it has one, its step)
imported below, plus its test; see docs/architecture.md for a worked example.
"""

from trustmatch.methods import supervised, fixmatch, flexmatch, freematch, softmatch, uda, csl, unimatch  # noqa: F401,I001  (registration order: the order of every method list)
from trustmatch.methods.csl_selection import csl_boundary, csl_features, csl_select
from trustmatch.methods.fixmatch import FixMatchSelector
from trustmatch.methods.flexmatch import FlexMatchSelector, flexmatch_class_thresholds
from trustmatch.methods.freematch import FreeMatchSelector, freematch_class_thresholds, freematch_fairness_loss
from trustmatch.methods.method import METHODS, Method, MethodConfig, SSLMethod, build_method, method_config
from trustmatch.methods.selector import Selection, Selector, fixed_threshold
from trustmatch.methods.softmatch import SoftMatchSelector, align_to_uniform, softmatch_weights
from trustmatch.methods.uda import UDASelector, sharpen
from trustmatch.methods.csl import CSLSelector

__all__ = [
    "METHODS",
    "CSLSelector",
    "FixMatchSelector",
    "FlexMatchSelector",
    "FreeMatchSelector",
    "Method",
    "MethodConfig",
    "SSLMethod",
    "Selection",
    "Selector",
    "SoftMatchSelector",
    "UDASelector",
    "align_to_uniform",
    "build_method",
    "csl_boundary",
    "csl_features",
    "csl_select",
    "fixed_threshold",
    "flexmatch_class_thresholds",
    "freematch_class_thresholds",
    "freematch_fairness_loss",
    "method_config",
    "sharpen",
    "softmatch_weights",
]
