"""The transformer itself: packed layers of each family and the split of a checkpoint into the frozen
lower part (ABE, offline) and the trainable upper part (BA, online)."""
