"""One module per resource: inference, health, model metadata, metrics."""
