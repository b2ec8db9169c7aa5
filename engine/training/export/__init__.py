"""`bahe features`: BAHE's feature block (engine.export.block) for every example of a training log, past-only and
out-of-sample: the timeline forward per example (log_features), out-of-fold scorers (fold_scorers), the command
and its leak guard (features_command)."""
