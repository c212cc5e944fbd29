"""trustmatch: semi-supervised learning for vision with pseudo-labels you can trust."""

__version__ = "0.1.0"
