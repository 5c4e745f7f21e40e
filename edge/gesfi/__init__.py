"""GesFi on the device: CSI -> signed Doppler images (preprocess) and the edge source (source)."""
