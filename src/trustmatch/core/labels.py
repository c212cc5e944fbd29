"""Label values with a meaning of their own, shared by data, losses and metrics."""

IGNORE = 255  # a mask pixel no loss, statistic or metric reads: padding, "void", unknown truth
