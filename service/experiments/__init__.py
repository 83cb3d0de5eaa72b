"""A/B experiments between architectures: config, routing, statistics and reports."""
