"""Self-supervised training of image embeddings: InstDisc, MoCo v1/v2/v3 and SimCLR on one engine."""
