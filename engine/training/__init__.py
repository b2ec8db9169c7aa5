"""What produces a scorer: behavior logs and their features, training loops, the baselines (raw-token,
id-only, classic), metrics, memory and report helpers, the demo. Serving code never imports this package."""
