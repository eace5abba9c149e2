"""Input processing: turning images (and later text) into the tensors the encoders take."""
