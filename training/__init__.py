"""Training package: data reading, the shared preprocessing, the two models, evaluation."""
