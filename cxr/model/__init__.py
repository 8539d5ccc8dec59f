"""Model building, training and the saved model's metadata."""
