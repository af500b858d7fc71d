"""The multi-token-prediction transformer: the layer spec (`spec`), the heads (`heads`), one
pipeline stage's model and the whole model's facts (`model`), and weights by global name
(`weights`). Nothing is imported here, so importing a submodule costs only what it needs."""
