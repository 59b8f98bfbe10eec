"""Data: decoding, in-memory uint8 data sets (Fashion-MNIST, image folders, the catalogue), augmentation."""
