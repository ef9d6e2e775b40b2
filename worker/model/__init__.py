"""Model code: networks, datasets, training, evaluation, export."""
