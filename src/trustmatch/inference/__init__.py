"""``trustmatch predict``: a trained run's predictions for a user's files, one module per task."""
