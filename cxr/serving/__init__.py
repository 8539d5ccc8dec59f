"""Using a trained model: cxr predict, cxr serve, the LiteRT export and runtime."""
