"""Evaluation: the paper's VQA metrics (`metrics`), scoring files by id (`scoring`), the eval
runner (`evaluate`), classification by log-likelihood (`classification`), routing analysis
(`routing`) and reports (`report`)."""
