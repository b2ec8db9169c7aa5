"""BAHE as a feature provider: the feature block (block), the training record that guards against stacking on
in-sample logits (record), the block for live requests (online). The offline export of a log lives in the harness
(engine.training.export)."""
