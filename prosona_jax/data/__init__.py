"""Multi-rater data: sources, splits and Grain pipelines."""
