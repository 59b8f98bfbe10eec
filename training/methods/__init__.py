"""One module per paper: each is a `Method` (its model wrapper and loss); the engine is shared."""
