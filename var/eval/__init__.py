"""Evaluation: FID/IS/KID/precision-recall, classifier-space metrics on the embedded data, paired metrics."""
