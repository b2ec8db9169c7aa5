"""Id-keyed serving: a user-history store (user id -> item ids per named sequence, appended by events, snapshot
to disk) and `IdRanker`, which ranks and scores by user and item ids over it, keeping each user's incremental
state so an append costs O(new rows). A sub-room of serving: it imports serving's modules, serving's own modules
never import it. Import names from their modules; this file imports nothing."""
